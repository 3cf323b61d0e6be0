"""flaplace: functional, hook-free Laplace-LoRA.

Data flows one way: params -> capture -> kfac -> posterior -> evidence / predictive -> metrics.

Example:
    >>> import flaplace
    >>> params = flaplace.select_params(peft_model, "lora")
    >>> model_fn = flaplace.ModelFunction(peft_model, params, flaplace.LastTokenLogits(answer_ids))
    >>> factors, state = flaplace.fit_kfac(model_fn, params, train_batches, return_state=True)
    >>> posterior = flaplace.make_posterior(factors, params, prior_precision=1.0)
    >>> posterior, _ = flaplace.tune_prior_evidence(posterior, state.log_likelihood)
    >>> f_mu, f_var = flaplace.linearised_predictive(model_fn, posterior, test_batch)
    >>> probs = flaplace.predictive_probs(f_mu, f_var, link="probit")
"""

from flaplace.capture import CaptureError, capture
from flaplace.evidence import log_marginal_likelihood, tune_prior_evidence, tune_prior_grid
from flaplace.fisher import fisher_cotangents, log_likelihood
from flaplace.kfac import KFAC, KFACState, build, kfac_factors, reduce_across_ranks
from flaplace.kfac import fit as fit_kfac
from flaplace.metrics import accuracy, brier, classification_metrics, ece, nll
from flaplace.params import (
    LastTokenLogits,
    ModelFunction,
    classifier_logits,
    select_params,
    token_mask,
)
from flaplace.posterior import (
    load_posterior,
    make_posterior,
    sample,
    save_posterior,
    with_prior_precision,
)
from flaplace.predictive import (
    laplace_bridge_probs,
    linearised_predictive,
    mc_probs,
    per_example_jacobians,
    predictive_covariance,
    predictive_precompute,
    predictive_probs,
    probit_probs,
)
from flaplace.typing import Eigen, Factors, KronFactor, Params, Posterior
from flaplace.vocabulary import (
    NextTokenLogits,
    SequenceScores,
    TokenLogitsFunction,
    VocabularyPredictive,
    all_logits,
    linearised_decode,
    sample_perturbations,
    sequence_scores,
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
    "Eigen",
    "Factors",
    "KFACState",
    "KronFactor",
    "LastTokenLogits",
    "ModelFunction",
    "Params",
    "Posterior",
    "accuracy",
    "brier",
    "build",
    "capture",
    "classification_metrics",
    "classifier_logits",
    "ece",
    "fisher_cotangents",
    "fit_kfac",
    "kfac_factors",
    "laplace_bridge_probs",
    "linearised_predictive",
    "load_posterior",
    "log_likelihood",
    "log_marginal_likelihood",
    "make_posterior",
    "mc_probs",
    "nll",
    "per_example_jacobians",
    "predictive_covariance",
    "predictive_precompute",
    "predictive_probs",
    "probit_probs",
    "reduce_across_ranks",
    "sample",
    "save_posterior",
    "select_params",
    "token_mask",
    "tune_prior_evidence",
    "tune_prior_grid",
    "with_prior_precision",
]
