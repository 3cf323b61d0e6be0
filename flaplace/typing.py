"""Shared type aliases and the small containers that flow between modules.

Tensors are annotated with jaxtyping; the test suite checks the annotations at
run time with beartype (see ``tests/conftest.py``), the library itself never does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, TypeAlias

from jaxtyping import Bool, Float
from torch import Tensor

#: The adapted weights: a flat dict pytree ``{parameter name: tensor}``.
Params: TypeAlias = dict[str, Tensor]

#: A batch: a mapping of tensors (Hugging Face style, e.g. ``input_ids``,
#: ``attention_mask``, ``labels``) or a tuple ``(inputs, targets)``.
Batch: TypeAlias = Mapping[str, Any] | tuple[Any, ...] | list[Any]

#: ``f(params, batch) -> logits`` of shape ``(batch, classes)``.
ModelFn: TypeAlias = Callable[[Params, Batch], Float[Tensor, "batch classes"]]

Likelihood: TypeAlias = Literal["categorical", "bernoulli", "gaussian"]
FisherType: TypeAlias = Literal["mc", "exact", "empirical"]
Sharing: TypeAlias = Literal["expand", "reduce", "last"]

TokenMask: TypeAlias = Bool[Tensor, "batch tokens"]


class Eigen(NamedTuple):
    """A symmetric positive semi-definite matrix in eigen form ``Q diag(values) Q^T``.

    ``vectors`` may be thin (``d x k`` with ``k < d``): directions outside its
    span have eigenvalue 0.
    """

    vectors: Float[Tensor, "d k"]
    values: Float[Tensor, " k"]

    def dense(self) -> Float[Tensor, "*batch d d"]:
        """The matrix ``Q diag(values) Q^T`` itself (a ``d x d`` tensor: small sides only).

        Examples:
            >>> import torch
            >>> Eigen(torch.eye(2), torch.tensor([2.0, 3.0])).dense()
            tensor([[2., 0.],
                    [0., 3.]])
        """
        return (self.vectors * self.values.unsqueeze(-2)) @ self.vectors.mT


class KronFactor(NamedTuple):
    """The K-FAC block of one weight matrix: ``H_W ~ S (x) A``.

    ``S`` is the output-gradient factor (side ``o``), ``A`` the input factor
    (side ``i``), following the project's normalisation (``S`` sums over the data,
    ``A`` averages). ``transposed`` is a 0-d bool tensor: ``True`` when the
    parameter is stored as ``(i, o)`` and used as ``y = x W`` (GPT-2's
    ``Conv1D``); its gradients must then be transposed to ``(o, i)`` before
    ``S`` and ``A`` apply.
    """

    S: Eigen
    A: Eigen
    transposed: Bool[Tensor, ""]


#: K-FAC factors keyed by parameter name (the same keys as `Params`).
Factors: TypeAlias = dict[str, KronFactor]


class Posterior(NamedTuple):
    """A Laplace posterior over the adapted weights, one Kronecker block per weight.

    ``mean`` is the MAP ``theta*``; ``factors`` the eigen-form K-FAC factors;
    ``prior_precision`` a 0-d tensor ``lambda`` per block (same keys as ``mean``).
    Block precision: ``P = S (x) A + lambda I``.

    ``prior_mean`` is the centre ``m`` of the Gaussian prior ``N(m, 1/lambda I)``: ``None``
    (the default) for a prior centred at zero, or one tensor per block (same keys and shapes
    as ``mean``), e.g. the adapter weights at initialisation. It enters the evidence through
    ``||theta* - m||^2``; samples and predictives are centred at ``mean`` either way.
    """

    mean: Params
    factors: Factors
    prior_precision: dict[str, Tensor]
    prior_mean: Params | None = None
