"""flaplace: functional, hook-free Laplace-LoRA.

Data flows one way: params -> capture -> kfac -> posterior -> evidence / predictive -> metrics.

Examples:
    >>> import flaplace
    >>> params = flaplace.select_params(peft_model, "lora")
    >>> model_fn = flaplace.ModelFunction(peft_model, params, flaplace.LastTokenLogits(answer_ids))
    >>> factors, state = flaplace.fit_kfac(model_fn, params, train_batches)
    >>> posterior = flaplace.make_posterior(factors, params, prior_precision=1.0)
    >>> posterior, _ = flaplace.tune_prior_evidence(posterior, state.log_likelihood)
    >>> f_mu, f_var = flaplace.linearised_predictive(model_fn, posterior, test_batch)  # method="auto"
    >>> probs = flaplace.predictive_probs(f_mu, f_var, link="probit")
"""

from flaplace.capture import CaptureError, capture
from flaplace.compiling import compile_update
from flaplace.evidence import log_marginal_likelihood, tune_prior_evidence, tune_prior_grid
from flaplace.fisher import fisher_cotangents, log_likelihood
from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import KFAC, build
from flaplace.kfac import fit as fit_kfac
from flaplace.kfac_state import KFACState, input_factor_keys, kfac_factors, reduce_across_ranks
from flaplace.laplace import LaplaceLoRA, fit_laplace_lora
from flaplace.links import (
    centre_moments,
    gaussian_predictive,
    laplace_bridge_probs,
    mc_probs,
    predictive_probs,
    probit_probs,
)
from flaplace.metrics import accuracy, brier, classification_metrics, ece, nll
from flaplace.online import OnlineEvidenceState, build_online_evidence, online_posterior, prior_penalty
from flaplace.params import (
    LastTokenLogits,
    ModelFunction,
    classifier_logits,
    select_params,
    token_mask,
)
from flaplace.posterior import make_posterior, sample, with_prior_precision
from flaplace.posterior_io import load_posterior, save_posterior, validate_posterior
from flaplace.predictive import (
    informed_directions,
    linearised_predictive,
    predictive_covariance,
    predictive_precompute,
)
from flaplace.sampling import sampling_probs
from flaplace.scoring import ClozeModelFunction, cloze_batch, cloze_scores, flatten_choices, pair_batch
from flaplace.sequences import SequenceScores, linearised_decode, sequence_scores
from flaplace.sharding import unwrap_model
from flaplace.temperature import TemperedModelFunction, fit_temperature, tempered_moments
from flaplace.tempered_evidence import evidence_at_temperature, soften_by_evidence, tune_evidence_temperature
from flaplace.tempered_validation import (
    ScalingMixture,
    akaike_weight,
    mix_with_scaling,
    scaling_mixture,
    tune_prior_temperature_grid,
    tune_prior_temperature_nll,
)
from flaplace.typing import Eigen, Factors, KronFactor, Params, Posterior
from flaplace.validation import tune_prior_nll
from flaplace.vocabulary import (
    NextTokenLogits,
    TokenLogitsFunction,
    VocabularyPredictive,
    all_logits,
    sample_perturbations,
    vocabulary_predictive,
)

__version__ = "0.1.0"

__all__ = [
    "vocabulary_predictive",
    "sequence_scores",
    "sample_perturbations",
    "linearised_decode",
    "all_logits",
    "VocabularyPredictive",
    "TokenLogitsFunction",
    "SequenceScores",
    "NextTokenLogits",
    "KFAC",
    "CaptureError",
    "ClozeModelFunction",
    "Eigen",
    "Factors",
    "KFACState",
    "KronFactor",
    "LaplaceLoRA",
    "LastTokenLogits",
    "ModelFunction",
    "Params",
    "Posterior",
    "accuracy",
    "brier",
    "build",
    "capture",
    "centre_moments",
    "classification_metrics",
    "classifier_logits",
    "compile_update",
    "cloze_batch",
    "cloze_scores",
    "ece",
    "fisher_cotangents",
    "fit_kfac",
    "flatten_choices",
    "gaussian_predictive",
    "input_factor_keys",
    "kfac_factors",
    "fit_laplace_lora",
    "laplace_bridge_probs",
    "linearised_predictive",
    "load_posterior",
    "log_likelihood",
    "log_marginal_likelihood",
    "make_posterior",
    "mc_probs",
    "nll",
    "pair_batch",
    "per_example_jacobians",
    "predictive_covariance",
    "predictive_precompute",
    "informed_directions",
    "predictive_probs",
    "probit_probs",
    "reduce_across_ranks",
    "sample",
    "sampling_probs",
    "save_posterior",
    "select_params",
    "token_mask",
    "tune_prior_evidence",
    "tune_prior_grid",
    "tune_prior_nll",
    "unwrap_model",
    "validate_posterior",
    "with_prior_precision",
    "OnlineEvidenceState",
    "build_online_evidence",
    "online_posterior",
    "prior_penalty",
    "TemperedModelFunction",
    "evidence_at_temperature",
    "fit_temperature",
    "soften_by_evidence",
    "tempered_moments",
    "tune_evidence_temperature",
    "tune_prior_temperature_grid",
    "tune_prior_temperature_nll",
    "ScalingMixture",
    "akaike_weight",
    "mix_with_scaling",
    "scaling_mixture",
]
