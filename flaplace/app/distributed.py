"""Many processes: ``flaplace run`` under ``torchrun`` or ``accelerate launch``.

A launcher starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
[`start`][flaplace.app.distributed.start] reads them and initialises the default process
group (gloo on CPU, NCCL on CUDA, one device per local rank); the pipeline then splits its
work over the ranks:

| stage | every rank | communication |
|---|---|---|
| MAP | its rows of every training batch | gradients and the loss all-reduced each step |
| K-FAC | its share of the training batches | factors, counts and log-likelihood all-reduced |
| prior | the evidence (identical on every rank), or its share of the validation batches (grid) | the validation NLL all-reduced |
| predictive | its share of the test batches | ``f_mu``, ``f_var`` gathered |

Rank 0 alone reads and writes checkpoints and outputs and shows progress; whether a stage
is loaded or computed is its decision, and a loaded stage is sent to the other ranks.

Examples:
    >>> shard(list(range(5)), Ranks(rank=1, world=2, local_rank=1))
    [3, 4]
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_map

from flaplace.app.checkpoints import StageCache

T = TypeVar("T")

#: Environment variable: seconds a rank waits for the others in a collective before it fails.
TIMEOUT_VARIABLE = "FLAPLACE_DIST_TIMEOUT_S"
#: The default of ``FLAPLACE_DIST_TIMEOUT_S``: long enough for rank 0 to load a checkpoint.
DEFAULT_TIMEOUT_S = 1800.0


class Ranks(NamedTuple):
    """This process's place among the processes of a run.

    Examples:
        >>> Ranks(rank=0, world=1, local_rank=0).main
        True
    """

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files and shows progress."""
        return self.rank == 0


#: A single process.
SINGLE = Ranks(rank=0, world=1, local_rank=0)


def launched_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks a launcher (``torchrun``, ``accelerate launch``) gave this process; one process without one.

    Raises:
        ValueError: a malformed or inconsistent ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Examples:
        >>> launched_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        Ranks(rank=1, world=2, local_rank=1)
        >>> launched_ranks({})
        Ranks(rank=0, world=1, local_rank=0)
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun or "
            "accelerate launch); unset them to run one process"
        ) from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(
            f"inconsistent launcher environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}: "
            "launch with torchrun or accelerate launch, or unset them to run one process"
        )
    return Ranks(rank, world, local_rank)


def current_ranks() -> Ranks:
    """This process's ranks in the initialised default process group; one process without one.

    Examples:
        >>> current_ranks()  # no process group
        Ranks(rank=0, world=1, local_rank=0)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    rank = dist.get_rank()
    return Ranks(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:<local rank>``; ``cpu`` stays.

    Raises:
        ValueError: a device several processes cannot share (``cuda:<k>``, ``mps``).

    Examples:
        >>> rank_device("cuda", Ranks(rank=3, world=4, local_rank=1))
        'cuda:1'
        >>> rank_device("cpu", Ranks(rank=3, world=4, local_rank=1))
        'cpu'
    """
    if ranks.world == 1:
        return device
    kind = torch.device(device)
    if kind.type == "cpu":
        return device
    if kind.type == "cuda" and kind.index is None:
        return f"cuda:{ranks.local_rank}"
    if kind.type == "cuda":
        raise ValueError(
            f"--device {device} under {ranks.world} processes would put every rank on one GPU: pass "
            "--device cuda (rank r uses cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    raise ValueError(f"--device {device} cannot run several processes: use cuda or cpu")


def start(device: str, *, environ: Mapping[str, str] | None = None) -> tuple[Ranks, bool]:
    """Initialise the default process group when a launcher started several processes.

    The backend is NCCL for CUDA devices (each rank on ``cuda:<LOCAL_RANK>``) and gloo on
    CPU. A rank waits at most ``FLAPLACE_DIST_TIMEOUT_S`` seconds (default 1800) for the
    others in any collective, so a rank whose peer died fails instead of hanging.

    Returns:
        ``(ranks, started)``: ``started`` when this call created the group (pass it to
        [`stop`][flaplace.app.distributed.stop]). One process, or an existing group: nothing is done.

    Examples:
        >>> start("cpu", environ={})
        (Ranks(rank=0, world=1, local_rank=0), False)
    """
    ranks = launched_ranks(environ)
    if ranks.world == 1:
        return ranks, False
    if not dist.is_available():
        raise ValueError("this torch was built without torch.distributed: run one process")
    if dist.is_initialized():
        return current_ranks(), False
    device = rank_device(device, ranks)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    env = os.environ if environ is None else environ
    try:
        seconds = float(env.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds") from None
    dist.init_process_group(
        backend, rank=ranks.rank, world_size=ranks.world, timeout=datetime.timedelta(seconds=seconds)
    )
    return ranks, True


def threads_per_rank(threads: int, environ: Mapping[str, str] | None = None) -> int:
    """Intra-op threads of one process when ``LOCAL_WORLD_SIZE`` processes share this machine's cores.

    ``threads`` is what one process would use; the processes on one machine split it (at least 1
    each), so that CPU ranks do not oversubscribe the cores.

    Examples:
        >>> threads_per_rank(16, {"LOCAL_WORLD_SIZE": "4"})
        4
        >>> threads_per_rank(16, {})
        16
    """
    env = os.environ if environ is None else environ
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, threads // local)


def stop(started: bool) -> None:
    """Destroy the default process group if [`start`][flaplace.app.distributed.start] created it.

    Examples:
        >>> stop(False)
    """
    if started and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], ranks: Ranks, what: str = "batches") -> list[T]:
    """This rank's contiguous share of ``items`` (the shares differ in length by at most one).

    Contiguous shares, concatenated in rank order, give back ``items`` in order.

    Raises:
        ValueError: fewer items than ranks (a rank would have nothing to do).

    Examples:
        >>> [shard("abcde", Ranks(r, 2, r)) for r in (0, 1)]
        [['a', 'b', 'c'], ['d', 'e']]
    """
    if len(items) < ranks.world:
        raise ValueError(
            f"{len(items)} {what} for {ranks.world} processes: every process needs at least one; "
            "lower --eval-batch-size or run fewer processes"
        )
    base, extra = divmod(len(items), ranks.world)
    begin = ranks.rank * base + min(ranks.rank, extra)
    return list(items[begin : begin + base + (ranks.rank < extra)])


def rows(batch: Mapping[str, Tensor], ranks: Ranks) -> dict[str, Tensor]:
    """This rank's contiguous rows of a batch (dimension 0 of every tensor); may be empty.

    Examples:
        >>> rows({"x": torch.arange(5)}, Ranks(rank=1, world=2, local_rank=1))["x"]
        tensor([3, 4])
    """
    return {k: v.tensor_split(ranks.world)[ranks.rank] for k, v in batch.items()}


def all_sum(values: Tensor) -> Tensor:
    """The sum over ranks of ``values`` (every rank gets it); ``values`` itself without a group.

    Examples:
        >>> all_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if current_ranks().world == 1:
        return values
    out = values.detach().clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def broadcast_(tensors: Iterable[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's (each on its rank's device); nothing for one process.

    Examples:
        >>> broadcast_([torch.zeros(2)])
    """
    if current_ranks().world == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


class _OnDevice:
    """A tensor that was on an accelerator, sent through the CPU (placed on the receiver's device)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _pack(value: Any) -> Any:
    def leaf(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        return x.cpu() if x.device.type == "cpu" else _OnDevice(x.cpu())

    return tree_map(leaf, value)


def _unpack(value: Any, device: str | torch.device) -> Any:
    return tree_map(lambda x: x.tensor.to(device) if isinstance(x, _OnDevice) else x, value)


def broadcast(value: T, device: str | torch.device) -> T:
    """Rank 0's ``value`` on every rank; its tensors on an accelerator arrive on ``device``, CPU ones on the CPU.

    Examples:
        >>> broadcast({"a": torch.ones(1)}, "cpu")  # one process: the value itself
        {'a': tensor([1.])}
    """
    if current_ranks().world == 1:
        return value
    box = [_pack(value) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return _unpack(box[0], device)


def gather(value: T, device: str | torch.device) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (accelerator tensors placed on ``device``).

    Examples:
        >>> gather(torch.ones(1), "cpu")
        [tensor([1.])]
    """
    if current_ranks().world == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, _pack(value))
    return [_unpack(v, device) for v in out]


def check_same_config(options: Mapping[str, Any]) -> None:
    """Refuse to start when the ranks were given different options (they would disagree later).

    Raises:
        ValueError: naming the ranks whose options differ from rank 0's.

    Examples:
        >>> check_same_config({"steps": 10})  # one process: nothing to compare
    """
    if current_ranks().world == 1:
        return
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()
    digests = gather(digest, "cpu")
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(
            f"rank(s) {differ} were started with other options than rank 0: give every process "
            "the same command line"
        )


@contextlib.contextmanager
def rank_seeded(seed: int, ranks: Ranks, device: str) -> Iterator[None]:
    """Seed torch's generators with ``seed`` and the rank for the block (nothing for one process).

    Random draws (dropout masks) then differ between ranks instead of repeating on each; the
    generators' states are restored afterwards.

    Examples:
        >>> with rank_seeded(0, Ranks(rank=1, world=2, local_rank=1), "cpu"):
        ...     first = torch.rand(1)
    """
    if ranks.world == 1:
        yield
        return
    where = torch.device(device)
    cuda = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(rank_seed(seed, ranks))
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(rank_seed(seed, ranks))
        yield


def rank_seed(seed: int, ranks: Ranks) -> int:
    """The seed of this rank's random draws: ``seed`` itself on one process or rank 0.

    Examples:
        >>> rank_seed(5, Ranks(rank=2, world=4, local_rank=2))
        2000011
    """
    return seed + 1_000_003 * ranks.rank


class RankStages:
    """[`StageCache`][flaplace.app.checkpoints.StageCache] for several processes: rank 0 owns the files.

    Rank 0 decides whether a stage is loaded (its checkpoint carries the key) or computed and
    tells the others. A computed stage is computed by every rank (the compute function is
    collective: each rank does its share and they communicate); rank 0 stores it. A loaded
    stage is read by rank 0 and sent to every rank, so the other ranks never touch the
    output folder (which need not be shared between machines). One process: the cache itself.

    Examples:
        >>> import tempfile
        >>> stages = RankStages(Path(tempfile.mkdtemp()), SINGLE, "cpu")
        >>> stages.get("prior", "k", lambda: (None, {"prior_precision": 2.0}))[1]
        {'prior_precision': 2.0}
    """

    def __init__(self, folder: Path, ranks: Ranks, device: str) -> None:
        self.folder = folder
        self.ranks = ranks
        self.device = device
        self.cache = StageCache(folder) if ranks.main else None
        self._status: dict[str, str] = {}

    @property
    def status(self) -> dict[str, str]:
        """Which stages were ``loaded`` and which ``computed`` (the same on every rank)."""
        return self.cache.status if self.cache is not None else self._status

    def marker(self, stage: str) -> Path:
        """The marker file of ``stage`` (written by rank 0).

        Examples:
            >>> RankStages(Path("ckpt"), Ranks(1, 2, 1), "cpu").marker("map").name
            'map.json'
        """
        return self.folder / f"{stage}.json"

    def get(
        self,
        stage: str,
        key: str,
        compute: Callable[[], tuple[T, dict[str, Any]]],
        *,
        save: Callable[[Path, T], None] | None = None,
        load: Callable[[Path], T] | None = None,
    ) -> tuple[T, dict[str, Any]]:
        """Load or compute stage ``stage`` on every rank; see `StageCache.get`.

        Examples:
            >>> value, record = stages.get("map", key, compute, save=save, load=load)  # doctest: +SKIP
        """
        if self.ranks.world == 1:
            assert self.cache is not None
            return self.cache.get(stage, key, compute, save=save, load=load)
        stored = self.cache.has(stage, key, data=save is not None) if self.cache is not None else False
        loaded = broadcast(stored, "cpu")
        result: tuple[Any, dict[str, Any]] = (
            None,
            {},
        )  # on the other ranks of a loaded stage: rank 0's, below
        if self.cache is not None:
            result = self.cache.get(stage, key, compute, save=save, load=load)
        elif not loaded:
            result = compute()
        if loaded:
            result = broadcast(result, self.device)
        self._status[stage] = "loaded" if loaded else "computed"
        return result
