"""Hugging Face ``Trainer`` glue: from a trained Trainer (or a PEFT model and a DataLoader) to a posterior.

Post hoc, after ``trainer.train()``::

    la = laplace_from_trainer(trainer, answer_ids=answer_ids)  # fit K-FAC, tune the prior
    probs = la(batch)                                            # linearised predictive, probit

or at the end of training with `LaplaceCallback`. Batches come from the Trainer's own
DataLoaders (its collator's output), are moved to the model's device, and for causal language
models the collator's token labels (``-100`` everywhere but the answer) are turned into class
indices over the answer tokens (`answer_batch`).

The MAP that the Laplace posterior is centred on should be trained with the prior's penalty:
`GaussianPriorTrainer` adds it in ``compute_loss`` (see `gaussian_prior_penalty`
for the exact scaling and the weight-decay equivalence). The prior is centred at zero, or with
``prior_mean="init"`` at the adapters as they were before training (LoRA's random ``lora_A``
and zero ``lora_B``); `laplace_from_trainer` then gives the posterior the same centre.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flaplace.app.hfdatasets import DatasetLike, dataset_loaders
from flaplace.laplace import LaplaceLoRA, batch_to, fit_laplace_lora
from flaplace.params import LastTokenLogits, OutputFn, classifier_logits, select_params
from flaplace.tokens import SupervisedTokenLogits
from flaplace.typing import Batch, Params

#: The label value Hugging Face losses ignore.
IGNORE_INDEX = -100
#: The command line's names of the two default priors -> `LaplaceLoRA.optimize_prior_precision`'s methods.
PRIOR_NAMES = {"default": "evidence_temperature", "default-val": "val_nll_temperature"}
#: The methods that read validation data.
VALIDATION_PRIORS = ("val_nll", "val_nll_temperature", "grid", "gridsearch")
#: Where the Gaussian prior of the Trainer integration can be centred.
PRIOR_MEANS: tuple[str, ...] = ("zero", "init")

__all__ = [
    "GaussianPriorTrainer",
    "LaplaceCallback",
    "answer_batch",
    "fit_laplace",
    "gaussian_prior_penalty",
    "initial_prior_mean",
    "laplace_from_trainer",
]


def initial_prior_mean(
    model: nn.Module, prior_mean: str | Params | None, include: str | Sequence[str] = "lora"
) -> Params | None:
    """The prior's centre: ``None`` for ``"zero"``, a detached copy of the selected weights NOW for ``"init"``.

    Call it before training for ``"init"``: the copy is the adapters' initialisation (LoRA's
    random ``lora_A`` and zero ``lora_B``). A dict of tensors is returned as detached copies.

    Raises:
        ValueError: a ``prior_mean`` that is neither ``"zero"``, ``"init"``, ``None`` nor a dict.

    Examples:
        >>> centre = initial_prior_mean(peft_model, "init")  # before trainer.train()
        >>> initial_prior_mean(peft_model, "zero") is None
        True
    """
    if prior_mean is None or prior_mean == "zero":
        return None
    if prior_mean == "init":
        return {n: p.detach().clone() for n, p in select_params(model, include).items()}
    if isinstance(prior_mean, Mapping):
        return {n: t.detach().clone() for n, t in prior_mean.items()}
    raise ValueError(f"prior_mean must be one of {PRIOR_MEANS} or a dict of tensors, got {prior_mean!r}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_batch(batch: Mapping[str, Any], answer_ids: Sequence[int]) -> dict[str, Any]:
    """Turn a causal-LM collator batch with token labels into an answer-scoring batch.

    Causal-LM collators give ``labels`` of shape ``(batch, tokens)``: token ids, ``-100`` where
    no loss is taken. The answer of each example is its FIRST unmasked label token (an EOS after
    it may be unmasked too). The result has ``labels`` = the index of that token among
    ``answer_ids`` (``(batch,)``), and an ``attention_mask`` that ends just before the answer, so
    that the last real position is the one whose logits predict the answer (the model shifts its
    labels by one). Causal attention never looks ahead, so masking the answer and what follows
    it changes no earlier logit. A batch whose labels are already ``(batch,)`` class indices, or
    that has no labels, is returned unchanged (as a new dict).

    Raises:
        ValueError: a row with no unmasked label, or a label token that is not among
            ``answer_ids`` (naming the row, the token and the answer ids).

    Examples:
        >>> answer_batch({"input_ids": ids, "attention_mask": mask, "labels": token_labels}, [317, 347])
    """
    out = dict(batch)
    labels = out.get("labels")
    if not isinstance(labels, Tensor) or labels.ndim != 2:
        return out
    answers = torch.as_tensor(list(answer_ids), dtype=labels.dtype, device=labels.device)
    unmasked = labels != IGNORE_INDEX
    empty = (~unmasked.any(dim=1)).nonzero()
    if len(empty):
        raise ValueError(
            f"row {int(empty[0])} of the batch has no answer token: all its labels are {IGNORE_INDEX}; "
            "the collator must leave the answer token unmasked"
        )
    position = unmasked.int().argmax(dim=1)  # the first unmasked label of each row
    if bool((position == 0).any()):
        raise ValueError("an answer token at position 0 has no prompt before it to predict it from")
    tokens = labels.gather(1, position[:, None])[:, 0]
    match = tokens[:, None] == answers[None, :]
    missing = (~match.any(dim=1)).nonzero()
    if len(missing):
        row = int(missing[0])
        raise ValueError(
            f"the label token {int(tokens[row])} of row {row} is not one of the answer token ids "
            f"{answers.tolist()}; pass answer_ids that cover every answer (e.g. from answer_token_ids)"
        )
    mask = out.get("attention_mask")
    if not isinstance(mask, Tensor):
        mask = torch.ones_like(labels)
    keep = torch.arange(labels.shape[1], device=labels.device)[None, :] < position[:, None]
    out["attention_mask"] = mask * keep.to(mask.dtype)
    out["labels"] = match.int().argmax(dim=1)
    return out


class _BatchFn:
    """Move a batch to ``device`` and, with ``answer_ids``, score answers (`answer_batch`)."""

    def __init__(self, device: torch.device, answer_ids: Sequence[int] | None):
        self.device = device
        self.answer_ids = None if answer_ids is None else list(answer_ids)

    def __call__(self, batch: Batch) -> Batch:
        moved = batch_to(batch, self.device)
        if self.answer_ids is not None and isinstance(moved, Mapping):
            return answer_batch(moved, self.answer_ids)
        return moved


def fit_laplace(
    model: nn.Module,
    train_loader: Iterable[Batch] | DatasetLike,
    *,
    answer_ids: Sequence[int] | None = None,
    val_loader: Iterable[Batch] | DatasetLike | None = None,
    prior: str | None = None,
    **options: Any,
) -> LaplaceLoRA:
    """A fitted, prior-tuned [`LaplaceLoRA`][flaplace.laplace.LaplaceLoRA] from a PEFT model and a DataLoader.

    Args:
        model: the trained PEFT model (put in eval mode here).
        train_loader: batches of the training data as the collator makes them (dicts with
            ``input_ids``, ``attention_mask``, ``labels``); on any device. A tokenised
            ``datasets.Dataset`` is batched here (8 rows a batch, right-padded); a
            ``DatasetDict`` gives its training split (and its validation split as ``val_loader``).
        answer_ids: for a causal LM scored on answer tokens: the token id of each class (e.g.
            from [`flaplace.app.hf.answer_token_ids`][flaplace.app.hf.answer_token_ids]); ``None`` for a classification head,
            or for a causal LM fine-tuned generatively (SFT): its posterior is then fitted on the
            batches' token labels (``-100`` = no loss) with
            [`SupervisedTokenLogits`][flaplace.tokens.SupervisedTokenLogits], and its prior tuned by
            the evidence.
        val_loader: validation batches (for the validation-NLL priors).
        prior: as in ``flaplace run``: ``"default-val"`` (prior precision and likelihood
            temperature on validation NLL; the default when ``val_loader`` is given) or
            ``"default"`` (the evidence over the prior precision and a softening temperature
            ``T >= 1``; the default without one; for a generatively fine-tuned causal LM, the
            evidence at ``T = 1``, its only choice); or a method of
            [`LaplaceLoRA.optimize_prior_precision`][flaplace.laplace.LaplaceLoRA.optimize_prior_precision].
        **options: passed to [`fit_laplace_lora`][flaplace.laplace.fit_laplace_lora] (``include``, ``fisher``,
            ``prior_options``, ``jacobian_method``, ``directions``, ...), whose defaults are
            those of ``flaplace run`` (e.g. ``directions="informed"``).

    Examples:
        >>> la = fit_laplace(peft_model, train_loader, answer_ids=[317, 347])
        >>> probs = la(next(iter(test_loader)))
    """
    train_loader, val_loader = dataset_loaders(train_loader, val_loader, model)  # datasets -> batches
    output_fn: OutputFn = classifier_logits if answer_ids is None else LastTokenLogits(answer_ids)
    if answer_ids is None and _is_causal_lm(model):  # generative fine-tuning: its own token labels
        if prior not in (None, "default", "evidence", "marglik", "none"):
            raise ValueError(
                f"prior={prior!r} tunes on a classification predictive, but a causal LM without answer_ids "
                "is fitted on its token labels: use prior='default' (the evidence), or pass answer_ids to score answers"
            )
        output_fn, val_loader = SupervisedTokenLogits(), None
        prior = "evidence" if prior in (None, "default") else prior  # T = 1 over the vocabulary
    batch_fn = _BatchFn(_device_of(model), answer_ids)
    return fit_laplace_lora(
        model,
        train_loader,
        output_fn,
        prior=PRIOR_NAMES.get(prior, prior) if prior is not None else None,  # type: ignore[arg-type]
        val_batches=val_loader,
        batch_fn=batch_fn,
        **options,
    )


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the base of a PEFT model) is a Hugging Face causal language model."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return type(base).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def laplace_from_trainer(
    trainer: Any,
    *,
    answer_ids: Sequence[int] | None = None,
    prior: str | None = None,
    **options: Any,
) -> LaplaceLoRA:
    """A fitted, prior-tuned posterior from a trained ``transformers.Trainer``, post hoc.

    Uses the Trainer's model and its training DataLoader (``trainer.get_train_dataloader()``,
    the Trainer's own collator and batch size), and its evaluation DataLoader when it has an
    ``eval_dataset`` (then ``prior`` defaults to ``"default-val"``, else to ``"default"``; see
    `fit_laplace`). A `GaussianPriorTrainer` trained with ``prior_mean="init"``
    hands its prior's centre to the posterior (unless ``prior_mean`` is given here).

    Examples:
        >>> trainer.train()
        >>> la = laplace_from_trainer(trainer, answer_ids=answer_ids)
        >>> probs = la(batch)
    """
    wants_val = prior is None or PRIOR_NAMES.get(prior, prior) in VALIDATION_PRIORS
    has_val = getattr(trainer, "eval_dataset", None) is not None
    if wants_val and prior is not None and not has_val:
        raise ValueError(f"prior={prior!r} needs validation data: give the Trainer an eval_dataset")
    val = trainer.get_eval_dataloader() if wants_val and has_val else None
    centre = getattr(trainer, "prior_mean_values", None)
    if centre is not None and "prior_mean" not in options:
        options["prior_mean"] = centre
    return fit_laplace(
        trainer.model,
        trainer.get_train_dataloader(),
        answer_ids=answer_ids,
        val_loader=val,
        prior=prior,
        **options,
    )


def trainer_callback_base() -> type:
    """``transformers.TrainerCallback``, or ``object`` without the hf extra (a base class for callbacks)."""
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - the hf extra is missing
        return object
    return TrainerCallback


class LaplaceCallback(trainer_callback_base()):  # type: ignore[misc]
    """A ``TrainerCallback`` that fits the posterior when training ends; the result is ``.laplace``.

    ``prior_mean="init"`` centres the posterior's prior at the adapters as they were when
    training began (copied in ``on_train_begin``); pair it with a training loss whose L2 term
    pulls towards the same weights (`GaussianPriorTrainer` with ``prior_mean="init"``).

    Examples:
        >>> callback = LaplaceCallback(answer_ids=answer_ids)
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
        >>> probs = callback.laplace(batch)
    """

    def __init__(
        self,
        *,
        answer_ids: Sequence[int] | None = None,
        prior: str | None = None,
        prior_mean: str = "zero",
        **options: Any,
    ):
        if prior_mean not in PRIOR_MEANS:
            raise ValueError(f"prior_mean must be one of {PRIOR_MEANS}, got {prior_mean!r}")
        self.answer_ids = answer_ids
        self.prior = prior
        self.prior_mean = prior_mean
        self.prior_mean_values: Params | None = None
        self.options = options
        self.laplace: LaplaceLoRA | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.prior_mean == "init":
            if model is None:
                raise ValueError(
                    "LaplaceCallback(prior_mean='init') needs the Trainer's model at on_train_begin"
                )
            self.prior_mean_values = initial_prior_mean(model, "init", self.options.get("include", "lora"))
        return control

    def on_train_end(
        self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kwargs
    ):
        if model is None or train_dataloader is None:
            raise ValueError("LaplaceCallback needs the Trainer's model and train_dataloader at on_train_end")
        options = dict(self.options)
        if self.prior_mean_values is not None:
            options.setdefault("prior_mean", self.prior_mean_values)
        self.laplace = fit_laplace(
            model,
            train_dataloader,
            answer_ids=self.answer_ids,
            val_loader=eval_dataloader,
            prior=self.prior,
            **options,
        )
        return control


def gaussian_prior_penalty(
    model: nn.Module,
    prior_precision: float,
    n_train: int,
    include: str | Sequence[str] = "lora",
    prior_mean: Params | None = None,
) -> Tensor:
    """The Gaussian prior's term for a MEAN training loss: ``(lambda / (2 N)) ||theta - m||^2``.

    ``m`` is ``prior_mean`` (a tensor per selected weight, e.g. from
    `initial_prior_mean`), or zero when ``None``.

    With a prior ``N(0, (1/lambda) I)`` on the selected weights ``theta`` and ``N`` training
    examples, the negative log posterior is ``sum_n l_n(theta) + (lambda/2) ||theta||^2`` (+ const).
    Trainer's loss is the MEAN ``(1/N) sum_n l_n`` (per batch, an unbiased estimate of it), so
    the same MAP minimises ``mean loss + (lambda / (2N)) ||theta||^2``. Which optimiser settings
    give the same MAP:

    * this penalty, with ``weight_decay=0``: exact for any optimiser (the objective is the
      posterior's);
    * SGD (``optim="sgd"``) with ``weight_decay = lambda / N``: exact and step by step identical,
      since torch's SGD weight decay adds ``wd * theta`` to the gradient (the penalty's gradient);
    * Adam with coupled L2 (``torch.optim.Adam(weight_decay=lambda/N)``): the same stationary
      points (zero penalised gradient), different path;
    * AdamW (Trainer's default, decoupled decay ``theta <- theta - lr * wd * theta``): NOT a
      Gaussian prior. Its fixed points solve ``m_hat / (sqrt(v_hat) + eps) = -wd * theta``: the
      decay is compared with Adam's per-coordinate normalised gradient, so the implied prior is
      rescaled per coordinate by ``sqrt(v_hat)``. Decoupled and coupled decay coincide for SGD only.

    ``N`` is the number of terms the mean runs over: examples for a classification head, label
    tokens for a causal LM whose collator leaves more than the answer unmasked.

    Examples:
        >>> loss = outputs.loss + gaussian_prior_penalty(model, prior_precision=1.0, n_train=len(train_set))
    """
    if not prior_precision > 0 or n_train < 1:
        raise ValueError(
            f"prior_precision must be positive and n_train at least 1, got {prior_precision} and {n_train}"
        )
    names = set(select_params(model, include))
    if prior_mean is not None and set(prior_mean) != names:
        odd = sorted(set(prior_mean) ^ names)
        raise ValueError(
            f"prior_mean must have one tensor per selected weight; {odd[0]!r} is in only one of them"
        )
    squared = sum(
        (p if prior_mean is None else p - prior_mean[n].to(p.device, p.dtype)).square().sum()
        for n, p in model.named_parameters()
        if n in names
    )
    return prior_precision / (2 * n_train) * squared  # type: ignore[return-value]


def trainer_base() -> type:
    """``transformers.Trainer``, or ``object`` without the hf extra (a base class for Trainer variants)."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - the hf extra is missing
        return object
    return Trainer


class GaussianPriorTrainer(trainer_base()):  # type: ignore[misc]
    """A ``Trainer`` whose loss is the MAP objective of a Gaussian prior on the LoRA weights.

    ``loss = mean loss + (lambda / (2N)) ||theta - m||^2`` (`gaussian_prior_penalty`), with
    ``N = len(train_dataset)`` unless ``n_train`` is given. Set ``weight_decay=0`` in the
    ``TrainingArguments`` (the prior replaces it). ``prior_mean``: ``"zero"`` (``m = 0``),
    ``"init"`` (``m`` = the selected weights when the Trainer is built, i.e. the adapters'
    initialisation; kept as ``prior_mean_values`` and handed on by `laplace_from_trainer`), or
    a dict of tensors.

    Examples:
        >>> trainer = GaussianPriorTrainer(model=peft_model, args=args, train_dataset=data, prior_precision=1.0)
    """

    def __init__(
        self,
        *args: Any,
        prior_precision: float = 1.0,
        n_train: int | None = None,
        prior_include: str | Sequence[str] = "lora",
        prior_mean: str | Params = "zero",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.prior_precision = prior_precision
        self.n_train = n_train
        self.prior_include = prior_include
        self.prior_mean_values = initial_prior_mean(self.model, prior_mean, prior_include)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        n_train = self.n_train if self.n_train is not None else len(self.train_dataset)
        loss = loss + gaussian_prior_penalty(
            model, self.prior_precision, n_train, self.prior_include, self.prior_mean_values
        )
        return (loss, outputs) if return_outputs else loss
