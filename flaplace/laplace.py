"""One call for the common case: select the LoRA weights, fit K-FAC, tune the prior, predict.

`LaplaceLoRA` (and `fit_laplace_lora`, which builds, fits and tunes one) strings together the
library's pure functions (parameter selection, K-FAC, the posterior, a prior tuner, a predictive),
which stay the API for everything it does not cover; it only keeps their results together.

Two predictives are offered: ``"glm"``, the linearised predictive ``N(f_mu, J Sigma J^T)`` of the
logits through a link ([`flaplace.predictive`][flaplace.predictive]), and ``"nn"``, the class
probabilities averaged over weights drawn from the posterior ([`flaplace.sampling`][flaplace.sampling]).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import Tensor, nn

from flaplace.evidence import log_marginal_likelihood, tune_prior_evidence, tune_prior_grid
from flaplace.jacobians import JacobianMethod
from flaplace.kfac import fit as fit_kfac
from flaplace.links import Link, predictive_probs
from flaplace.metrics import nll as nll_metric
from flaplace.params import ModelFunction, OutputFn, batch_targets, classifier_logits, select_params
from flaplace.posterior import PriorPrecision, make_posterior, sample, with_prior_precision
from flaplace.predictive import (
    Directions,
    PredictiveCache,
    check_directions,
    linearised_predictive,
    predictive_precompute,
)
from flaplace.sampling import batch_to as batch_to  # re-exported for existing callers
from flaplace.sampling import logits_at as logits_at
from flaplace.sampling import sampling_probs
from flaplace.temperature import TemperedModelFunction, tempered_moments
from flaplace.tempered_evidence import MappedBatches, soften_by_evidence
from flaplace.tempered_validation import (
    ScalingMixture,
    mix_with_scaling,
    scaling_mixture,
    tempered_nll_at,
    tune_prior_temperature_grid,
)
from flaplace.typing import Batch, Likelihood, Params, Posterior
from flaplace.validation import tune_prior_nll, validation_features

PredType: TypeAlias = Literal["glm", "nn"]
PriorMethod: TypeAlias = Literal[
    "evidence", "evidence_temperature", "val_nll", "val_nll_temperature", "grid", "none", "marglik", "gridsearch"
]  # fmt: skip
PRIOR_METHODS: tuple[str, ...] = get_args(PriorMethod)
#: laplace-torch's names for the same methods.
ALIASES = {"marglik": "evidence", "gridsearch": "grid"}

__all__ = ["LaplaceLoRA", "fit_laplace_lora"]


class LaplaceLoRA:
    """A Laplace posterior over a model's LoRA weights, with its fit, prior tuning and predictives.

    The object holds the results of the pure functions (``params``, ``model_fn``, ``posterior``,
    ``log_likelihood``, ``history``); every step can also be done by calling them directly.

    Args:
        model: the fine-tuned model (e.g. a PEFT ``PeftModel``) at its MAP weights. ``fit`` puts it
            in eval mode (dropout off); the selected weights share storage with it.
        output_fn: turns the model output into ``(batch, classes)`` logits:
            [`classifier_logits`][flaplace.params.classifier_logits] (a classification head, the default) or
            [`LastTokenLogits`][flaplace.params.LastTokenLogits] (answer tokens of a causal LM).
        include: which weights the posterior covers (see [`select_params`][flaplace.params.select_params]).
        exclude: keywords of weights to leave out.
        likelihood: ``"categorical"`` or ``"bernoulli"``.
        prior_precision: the starting prior precision ``lambda`` (see
            [`make_posterior`][flaplace.posterior.make_posterior]).
        prior_mean: the centre of the prior, one tensor per selected weight (e.g. the LoRA
            weights at initialisation, when the MAP was trained with an L2 term towards them);
            ``None`` (default): zero.
        batch_fn: applied to every batch before use (e.g. moving it to the device, or turning
            token labels into class indices); default: move tensors to the weights' device.
        jacobian_method: how the linearised predictive computes Jacobians (``"auto"``,
            ``"vmap"``, ``"loop"`` or ``"capture"``, see [`per_example_jacobians`][flaplace.jacobians.per_example_jacobians]).
        directions: the covariance of the linearised predictive: ``"informed"`` (default, as
            in ``flaplace run`` and the Trainer helpers: only the directions where the data
            outweigh the prior) or ``"all"`` (the whole Laplace posterior's, the default of the
            core function [`predictive_precompute`][flaplace.predictive.predictive_precompute]).
            The sampling predictive (``pred_type="nn"``) always draws from the whole posterior.
        **kfac_options: passed to [`build`][flaplace.kfac.build] (``fisher``, ``sharing``,
            ``n_kfac``, ``lr_threshold``, ``generator``, ...).

    Examples:
        >>> la = LaplaceLoRA(peft_model).fit(train_loader).optimize_prior_precision()
        >>> probs = la(test_batch)  # linearised predictive, probit link
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: OutputFn = classifier_logits,
        *,
        include: str | Sequence[str] = "lora",
        exclude: str | Sequence[str] = (),
        likelihood: Likelihood = "categorical",
        prior_precision: PriorPrecision = 1.0,
        prior_mean: Params | None = None,
        batch_fn: Callable[[Batch], Batch] | None = None,
        jacobian_method: JacobianMethod = "auto",
        directions: Directions = "informed",
        **kfac_options: Any,
    ):
        if likelihood not in ("categorical", "bernoulli"):
            raise ValueError(
                f"LaplaceLoRA supports likelihood 'categorical' or 'bernoulli', got {likelihood!r}; "
                "use the pure functions for a gaussian likelihood"
            )
        self.model = model
        self.params: Params = select_params(model, include, exclude=exclude)
        self.model_fn = ModelFunction(model, self.params, output_fn)
        self.likelihood: Likelihood = likelihood
        self.initial_prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.kfac_options = kfac_options
        self.jacobian_method: JacobianMethod = jacobian_method
        check_directions(directions)  # at construction, not at the first prediction
        self.directions: Directions = directions
        device = next(iter(self.params.values())).device
        self.batch_fn: Callable[[Batch], Batch] = batch_fn or (lambda b: batch_to(b, device))
        self.posterior: Posterior | None = None
        self.log_likelihood: Tensor | None = None
        self.history: list[dict[str, Any]] = []
        #: The likelihood temperature: the predictive is that of the logits over ``T`` (tuned
        #: with ``optimize_prior_precision("val_nll_temperature")``; 1 otherwise).
        self.temperature = 1.0
        #: ``"val_nll_temperature"``'s average with temperature scaling of the MAP (probabilities
        #: ``weight * p_posterior + (1 - weight) * softmax(f_mu / temperature)``); ``None`` otherwise.
        self.scaling: ScalingMixture | None = None
        self._cache: PredictiveCache | None = None

    def _batches(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        return (self.batch_fn(b) for b in batches)

    def _posterior(self) -> Posterior:
        if self.posterior is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(train_batches) first")
        return self.posterior

    def fit(self, batches: Iterable[Batch], *, progress: bool = False) -> LaplaceLoRA:
        """Fit K-FAC factors on the training batches and form the posterior at the initial prior.

        Examples:
            >>> la.fit(train_loader)
        """
        factors, state = fit_kfac(  # the model function evaluates in eval mode
            self.model_fn,
            self.params,
            self._batches(batches),
            likelihood=self.likelihood,
            progress=progress,
            **self.kfac_options,
        )
        self.posterior = make_posterior(
            factors, self.params, self.initial_prior_precision, prior_mean=self.prior_mean
        )
        self.log_likelihood = state.log_likelihood
        self._cache = None
        return self

    def optimize_prior_precision(
        self,
        method: PriorMethod = "evidence",
        *,
        val_batches: Iterable[Batch] | None = None,
        train_batches: Iterable[Batch] | None = None,
        link: Link = "probit",
        grid: Sequence[float] | None = None,
        per_block: bool | Sequence[str] = False,
        progress: bool = False,
        **options: Any,
    ) -> LaplaceLoRA:
        """Tune the prior precision (``"evidence"``, default) and, on validation data, a temperature.

        Args:
            method: ``"evidence"`` maximises the log marginal likelihood
                ([`tune_prior_evidence`][flaplace.evidence.tune_prior_evidence]); ``"evidence_temperature"``
                maximises it over ``lambda`` and a softening temperature ``T >= 1`` (`temperature`)
                that also raises the training log-likelihood by more than ``log(N) / 2``, one
                K-FAC pass of ``train_batches`` per temperature tried
                ([`soften_by_evidence`][flaplace.tempered_evidence.soften_by_evidence]); ``"val_nll"`` minimises the
                validation NLL of the linearised predictive by Adam on ``log lambda``
                ([`tune_prior_nll`][flaplace.validation.tune_prior_nll]); ``"grid"`` picks the lowest
                validation NLL on a grid ([`tune_prior_grid`][flaplace.evidence.tune_prior_grid]);
                ``"val_nll_temperature"`` picks ``lambda`` and the likelihood temperature ``T``
                (`temperature`) with the lowest validation NLL, temperature scaling of the MAP
                included ([`tune_prior_temperature_grid`][flaplace.tempered_validation.tune_prior_temperature_grid]),
                then averages that posterior's probabilities with temperature scaling's by their
                Akaike weights (`scaling`, [`scaling_mixture`][flaplace.tempered_validation.scaling_mixture]);
                ``"none"`` keeps the current value. laplace-torch's names ``"marglik"`` and
                ``"gridsearch"`` are accepted for ``"evidence"`` and ``"grid"``.
            val_batches: validation batches with labels (``"val_nll"`` and ``"grid"``).
            train_batches: the training batches of `fit` again (``"evidence_temperature"``; a
                list or a DataLoader: they are read once per temperature).
            link: the link of the validation predictive (``"val_nll"``: ``"probit"`` or
                ``"bridge"``; ``"grid"``: any).
            grid: candidate prior precisions for ``"grid"``.
            per_block: one ``lambda`` for all blocks (``False``), one per block, or per keyword group.
            progress: show a progress bar.
            **options: passed to the tuner (e.g. ``steps``, ``lr``, ``tol``).

        Examples:
            >>> la.optimize_prior_precision("val_nll", val_batches=val_loader)
        """
        posterior = self._posterior()
        if method not in PRIOR_METHODS:
            raise ValueError(f"method must be one of {PRIOR_METHODS}, got {method!r}")
        method = ALIASES.get(method, method)  # type: ignore[assignment]
        if method == "none":
            return self
        assert self.log_likelihood is not None
        temperature, log_likelihood, scaling = self.temperature, self.log_likelihood, None
        if method == "evidence_temperature":
            if train_batches is None:
                raise ValueError("method 'evidence_temperature' needs train_batches (fit's training data)")
            best, history = soften_by_evidence(
                self.model_fn, self.params, MappedBatches(train_batches, self.batch_fn), posterior,
                log_likelihood, per_block=per_block, tune_options=options, progress=progress,
                likelihood=self.likelihood, **self.kfac_options,
            )  # fmt: skip
            tuned, temperature, log_likelihood = best.posterior, best.temperature, best.log_likelihood
        elif method == "evidence":
            tuned, history = tune_prior_evidence(
                posterior, log_likelihood, per_block=per_block, progress=progress, **options
            )
        elif val_batches is None:
            raise ValueError(f"method {method!r} needs val_batches (validation batches with labels)")
        elif method == "val_nll_temperature":
            if per_block is not False:
                raise ValueError("method 'val_nll_temperature' tunes one prior precision for all blocks")
            val = [self.batch_fn(b) for b in val_batches]
            features = validation_features(posterior, self.model_fn, val, method=self.jacobian_method)
            nll_at = tempered_nll_at(features, link=link, likelihood=self.likelihood, directions=self.directions)  # fmt: skip
            with torch.no_grad():
                tuned, temperature, table = tune_prior_temperature_grid(posterior, nll_at, progress=progress, **options)  # fmt: skip
            scaling = scaling_mixture(table, len(features.labels))
            history = [dict(row) for row in table]
        elif method == "val_nll":
            tuned, history = tune_prior_nll(
                posterior, self.model_fn, [self.batch_fn(b) for b in val_batches], link=link,
                likelihood=self.likelihood, per_block=per_block, method=self.jacobian_method,
                directions=self.directions, progress=progress, **options,
            )  # fmt: skip
        else:
            if per_block is not False:
                raise ValueError("method 'grid' tunes one prior precision for all blocks (per_block=False)")
            val = [self.batch_fn(b) for b in val_batches]

            def val_nll(candidate: Posterior) -> float:
                return nll_metric(*self._predict_all(candidate, val, link=link))

            tuned, table = tune_prior_grid(posterior, val_nll, grid, progress=progress)
            history = [dict(row) for row in table]
        self.posterior, self.temperature, self.log_likelihood = tuned, temperature, log_likelihood
        self.history, self.scaling, self._cache = history, scaling, None
        return self

    @property
    def prior_precision(self) -> dict[str, float]:
        """The prior precision of each block, as floats.

        Examples:
            >>> la.prior_precision["...lora_A.default.weight"]
        """
        return {n: float(v) for n, v in self._posterior().prior_precision.items()}

    def log_marginal_likelihood(self, prior_precision: PriorPrecision | None = None) -> Tensor:
        """The Laplace log evidence at the current (or the given) prior precision.

        Examples:
            >>> float(la.log_marginal_likelihood())
        """
        posterior = self._posterior()
        if prior_precision is not None:
            posterior = with_prior_precision(posterior, prior_precision)
        assert self.log_likelihood is not None
        return log_marginal_likelihood(posterior, self.log_likelihood)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Params:
        """Weight draws from the posterior, ``{name: (n_samples, *shape)}``.

        Examples:
            >>> draws = la.sample(8)
        """
        return sample(self._posterior(), n_samples, generator)

    def predictive(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The linearised predictive ``(f_mu (B, C), f_var (B, C, C))`` of one batch.

        These are the posterior's moments; `predict` also averages in temperature scaling of
        the MAP where `scaling` is set (``"val_nll_temperature"``).

        Examples:
            >>> f_mu, f_var = la.predictive(batch)
        """
        return self._moments(self.batch_fn(batch))

    def _moments(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The linearised predictive of a batch already passed through ``batch_fn``."""
        if self._cache is None:
            self._cache = predictive_precompute(self._posterior(), self.directions)
        f_mu, f_var = linearised_predictive(self.model_fn, self._cache, batch, method=self.jacobian_method)
        return tempered_moments(f_mu, f_var, self.temperature) if self.temperature != 1.0 else (f_mu, f_var)

    def predict(
        self,
        batch: Batch,
        pred_type: PredType = "glm",
        link: Link = "probit",
        *,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Class probabilities for one batch.

        Args:
            batch: the inputs (labels, if any, are ignored).
            pred_type: ``"glm"`` (linearised predictive and ``link``) or ``"nn"`` (sampling
                predictive, `sampling_probs`).
            link: ``"probit"``, ``"bridge"`` or ``"mc"`` (``"glm"`` only).
            n_samples: samples for ``link="mc"`` or ``pred_type="nn"``.
            generator: random generator for the samples.

        Returns:
            Probabilities ``(B, C)`` (``(B, 2)`` for the bernoulli likelihood).

        Examples:
            >>> probs = la.predict(batch, pred_type="nn", n_samples=64)
        """
        return self._predict(self.batch_fn(batch), pred_type, link, n_samples=n_samples, generator=generator)

    __call__ = predict

    def _predict(
        self,
        batch: Batch,
        pred_type: PredType = "glm",
        link: Link = "probit",
        *,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if pred_type == "glm":
            f_mu, f_var = self._moments(batch)
            probs = predictive_probs(
                f_mu, f_var, link, self.likelihood, n_samples=n_samples, generator=generator
            )
            return mix_with_scaling(probs.detach(), f_mu * self.temperature, self.scaling, self.likelihood)
        if pred_type == "nn":
            tempered = self.model_fn if self.temperature == 1.0 else TemperedModelFunction(self.model_fn, self.temperature)  # fmt: skip
            probs = sampling_probs(tempered, self._posterior(), batch, n_samples, generator=generator, likelihood=self.likelihood)  # fmt: skip
            if self.scaling is None:
                return probs
            return mix_with_scaling(probs, self.model_fn(self.params, batch).detach(), self.scaling, self.likelihood)  # fmt: skip
        raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")

    def _predict_all(
        self, posterior: Posterior, batches: Sequence[Batch], *, link: Link
    ) -> tuple[Tensor, Tensor]:
        cache = predictive_precompute(posterior, self.directions)
        probs, labels = [], []
        for batch in batches:
            f_mu, f_var = linearised_predictive(self.model_fn, cache, batch, method=self.jacobian_method)
            probs.append(predictive_probs(f_mu, f_var, link, self.likelihood).detach())
            labels.append(batch_targets(batch))
        return torch.cat(probs), torch.cat(labels)

    def predict_all(
        self, batches: Iterable[Batch], pred_type: PredType = "glm", link: Link = "probit", **options: Any
    ) -> tuple[Tensor, Tensor | None]:
        """Probabilities for every batch, concatenated, and the labels when the batches have them.

        Examples:
            >>> probs, labels = la.predict_all(test_loader)
            >>> classification_metrics(probs, labels)
        """
        probs, labels = [], []
        for batch in batches:
            moved = self.batch_fn(batch)
            probs.append(self._predict(moved, pred_type, link, **options))
            with contextlib.suppress(KeyError):
                labels.append(batch_targets(moved))
        return torch.cat(probs), (torch.cat(labels) if len(labels) == len(probs) else None)


def fit_laplace_lora(
    model: nn.Module,
    train_batches: Iterable[Batch],
    output_fn: OutputFn = classifier_logits,
    *,
    prior: PriorMethod | None = None,
    val_batches: Iterable[Batch] | None = None,
    link: Link = "probit",
    prior_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> LaplaceLoRA:
    """Build a `LaplaceLoRA`, fit it on ``train_batches`` and tune its prior, in one call.

    Args:
        model: the fine-tuned model at its MAP weights.
        train_batches: the training data (any iterable of batches with labels, e.g. a DataLoader).
        output_fn: see `LaplaceLoRA`.
        prior: ``None`` (default): ``"val_nll_temperature"`` (prior precision and temperature on
            validation NLL, temperature scaling included) when ``val_batches`` are given, else
            ``"evidence_temperature"`` (the evidence over ``lambda`` and ``T >= 1``; ``"evidence"``
            with a warning when ``train_batches`` cannot be read twice); or any method of
            `LaplaceLoRA.optimize_prior_precision`.
        val_batches: validation batches for the validation-NLL methods.
        link: the validation predictive's link for ``"val_nll"``/``"grid"``.
        prior_options: passed to `LaplaceLoRA.optimize_prior_precision`.
        progress: show progress bars.
        **options: passed to `LaplaceLoRA` (``include``, ``likelihood``, ``batch_fn``,
            ``fisher``, ...).

    Examples:
        >>> la = fit_laplace_lora(peft_model, train_loader, LastTokenLogits(answer_ids))
        >>> probs = la(test_batch, link="probit")
    """
    la = LaplaceLoRA(model, output_fn, **options).fit(train_batches, progress=progress)
    once = iter(train_batches) is train_batches
    if prior is None and val_batches is None and once:
        warnings.warn("train_batches can be read only once: the prior is tuned at T = 1", stacklevel=2)
    prior = prior or (
        "val_nll_temperature" if val_batches else "evidence" if once else "evidence_temperature"
    )
    return la.optimize_prior_precision(
        prior, val_batches=val_batches, train_batches=train_batches, link=link, progress=progress,
        **dict(prior_options or {}),
    )  # fmt: skip
