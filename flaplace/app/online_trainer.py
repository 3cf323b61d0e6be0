"""Online evidence tuning inside ``transformers.Trainer``: the prior precision moves while the adapter trains.

`OnlineEvidenceCallback` runs [`build_online_evidence`][flaplace.online.build_online_evidence]'s
``update`` after every optimiser step, on the batches of that step; `OnlineEvidenceTrainer` adds
the current prior's exact penalty (``(lambda / (2N)) ||theta - m||^2`` per block,
[`prior_penalty`][flaplace.online.prior_penalty]) to the training loss and hands the callback
each batch. When training ends the callback refits K-FAC on the last window at the final weights
and its ``posterior`` (the tuned prior, factors rescaled to the whole training set) is ready::

    online = OnlineEvidenceCallback(answer_ids=answer_ids, every=20, fisher="exact")
    trainer = OnlineEvidenceTrainer(model=peft_model, args=args, train_dataset=data, online=online)
    trainer.train()
    f_mu, f_var = linearised_predictive(online.model_fn, online.posterior, batch)

Set ``weight_decay=0`` in the ``TrainingArguments``: the prior's penalty replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from flaplace.app.trainer import answer_batch, initial_prior_mean, trainer_base, trainer_callback_base
from flaplace.online import (
    OnlineEvidenceState,
    build_online_evidence,
    online_posterior,
    prior_penalty,
)
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits, select_params
from flaplace.sampling import batch_to
from flaplace.sharding import unwrap_model
from flaplace.typing import Batch, Params, Posterior

__all__ = ["OnlineEvidenceCallback", "OnlineEvidenceTrainer"]


class OnlineEvidenceCallback(trainer_callback_base()):  # type: ignore[misc]
    """A ``TrainerCallback`` that tunes the prior precision by the evidence while the Trainer trains.

    Every ``every`` optimiser steps it refits K-FAC at the current weights on the batches of the
    last ``window`` steps and takes evidence-gradient steps on ``log lambda`` (see
    [`build_online_evidence`][flaplace.online.build_online_evidence], which also states how the
    window is rescaled to the whole training set). Pair it with `OnlineEvidenceTrainer`, which
    feeds it the batches and trains under the current prior.

    Args:
        answer_ids: for a causal LM scored on answer tokens: the token id of each class; ``None``
            for a classification head.
        n_train: ``N``; default ``len(train_dataset)`` (the Trainer's convention for the penalty).
        every: optimiser steps between refreshes.
        window: optimiser steps whose batches a refresh uses (default ``every``).
        include: which weights the prior covers (see [`select_params`][flaplace.params.select_params]).
        prior_precision: the starting ``lambda``.
        prior_mean: ``"zero"`` or ``"init"`` (the adapters when training begins).
        per_block: one ``lambda`` (``False``), one per block (``True``) or per keyword group.
        evidence_steps: Adam steps on ``log lambda`` per refresh.
        lr: Adam's learning rate on ``log lambda``.
        refresh_at_end: refit K-FAC on the last window at the final weights when training ends.
        **kfac_options: passed to [`build`][flaplace.kfac.build] (``fisher``, ``sharing``, ...).

    Attributes:
        state: the [`OnlineEvidenceState`][flaplace.online.OnlineEvidenceState] (``None`` before training).
        model_fn: the model function the factors were fitted with.
        posterior: the posterior when training has ended (``None`` before).
        history: ``{"step", "prior_precision", "log_evidence"}`` after each refresh.

    Examples:
        >>> online = OnlineEvidenceCallback(answer_ids=answer_ids, every=20, fisher="exact")  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        answer_ids: Sequence[int] | None = None,
        n_train: int | None = None,
        every: int = 50,
        window: int | None = None,
        include: str | Sequence[str] = "lora",
        prior_precision: float = 1.0,
        prior_mean: str = "zero",
        per_block: bool | Sequence[str] = False,
        evidence_steps: int = 100,
        lr: float = 0.1,
        refresh_at_end: bool = True,
        **kfac_options: Any,
    ):
        if prior_mean not in ("zero", "init"):
            raise ValueError(f"prior_mean must be 'zero' or 'init', got {prior_mean!r}")
        self.answer_ids = None if answer_ids is None else list(answer_ids)
        self.n_train = n_train
        self.include = include
        self.prior_mean = prior_mean
        self.refresh_at_end = refresh_at_end
        self.settings: dict[str, Any] = {
            "every": every,
            "window": window,
            "prior_precision": prior_precision,
            "per_block": per_block,
            "evidence_steps": evidence_steps,
            "lr": lr,
            **kfac_options,
        }
        self.state: OnlineEvidenceState | None = None
        self.model_fn: ModelFunction | None = None
        self.posterior: Posterior | None = None
        self.history: list[dict[str, Any]] = []
        self._names: list[str] = []
        self._pending: list[Batch] = []
        self._update: Any = None

    # ----------------------------------------------------------------- called by the trainer

    def observe(self, batch: Batch, model: nn.Module) -> None:
        """Keep one (micro-)batch of the current optimiser step, as the model function reads it."""
        moved = batch_to(batch, next(model.parameters()).device)
        if self.answer_ids is not None and isinstance(moved, Mapping):
            moved = answer_batch(moved, self.answer_ids)
        self._pending.append(moved)

    def penalty(self, model: nn.Module) -> Tensor:
        """The current prior's term for the mean training loss, differentiable in the model's weights.

        Raises:
            RuntimeError: called before training began (``on_train_begin`` sets the prior up).
        """
        if self.state is None:
            raise RuntimeError("OnlineEvidenceCallback has no state yet: it is set up when training begins")
        params = self._live_params(model)
        return prior_penalty(params, self.state.prior_precision, self.state.n_train, self.state.prior_mean)

    def _live_params(self, model: nn.Module) -> Params:
        named = dict(unwrap_model(model).named_parameters())
        return {n: named[n] for n in self._names}

    # ----------------------------------------------------------------- TrainerCallback events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("OnlineEvidenceCallback needs the Trainer's model at on_train_begin")
        params = select_params(unwrap_model(model), self.include)
        self._names = list(params)
        output_fn = classifier_logits if self.answer_ids is None else LastTokenLogits(self.answer_ids)
        self.model_fn = ModelFunction(model, params, output_fn)
        n_train = self.n_train
        if n_train is None:
            dataset = getattr(train_dataloader, "dataset", None)
            if dataset is None:
                raise ValueError("OnlineEvidenceCallback needs n_train, or a train_dataloader with a dataset")
            n_train = len(dataset)
        centre = initial_prior_mean(model, self.prior_mean, self.include)
        init, self._update = build_online_evidence(
            self.model_fn, n_train=n_train, prior_mean=centre, **self.settings
        )
        self.state = init(params)
        self._pending = []
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.state is None or model is None or not self._pending:
            return control
        before = int(self.state.refreshes)
        self.state = self._update(self.state, self._live_params(model), *self._pending)
        self._pending = []
        if int(self.state.refreshes) > before:
            self._record(state.global_step)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.state is None or model is None:
            return control
        if self.refresh_at_end and self.state.window:
            was_training = model.training
            self.state = self._update(self.state, self._live_params(model), refresh=True)
            model.train(was_training)
            self._record(state.global_step)
        if self.state.factors is not None:
            final = {n: p.detach() for n, p in self._live_params(model).items()}
            self.posterior = online_posterior(self.state, final)
        return control

    def _record(self, step: int) -> None:
        assert self.state is not None
        self.history.append(
            {
                "step": step,
                "prior_precision": {n: float(v) for n, v in self.state.prior_precision.items()},
                "log_evidence": float(self.state.log_evidence),
            }
        )


class OnlineEvidenceTrainer(trainer_base()):  # type: ignore[misc]
    """A ``Trainer`` whose loss uses the prior that an `OnlineEvidenceCallback` tunes as it trains.

    ``loss = mean loss + sum_b (lambda_b / (2N)) ||theta_b - m_b||^2`` with the callback's current
    ``lambda`` (the same scaling as ``GaussianPriorTrainer``, whose prior is fixed). The callback is
    added to the Trainer's callbacks and given every training batch.

    Args:
        online: the callback that holds and tunes the prior.
        *args: ``transformers.Trainer``'s positional arguments.
        **kwargs: ``transformers.Trainer``'s keyword arguments.

    Examples:
        >>> online = OnlineEvidenceCallback(every=20, fisher="exact")  # doctest: +SKIP
        >>> trainer = OnlineEvidenceTrainer(model=model, args=args, train_dataset=data, online=online)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> online.posterior  # doctest: +SKIP
    """

    def __init__(self, *args: Any, online: OnlineEvidenceCallback, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.online = online
        self.add_callback(online)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.online.observe(inputs, model)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        penalty = self.online.penalty(model)
        loss = loss + penalty.to(dtype=loss.dtype, device=loss.device)
        return (loss, outputs) if return_outputs else loss
