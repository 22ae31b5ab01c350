"""Data-parallel MeZO across processes with only scalars on the wire.

Run ``torchrun --nproc-per-node N -m zo_objectives.cli ...`` (or ``torchrun ... $(which zo-tune) ...``).
Every rank holds the full model and the same MeZO seed, so every rank draws the same noise z and the same
batch (``batch_indices`` is a pure function of (seed, step)). Each rank scores only its shard
``batch[rank::world]``, and :class:`ShardedObjective` all-reduces the shard losses into the batch loss (one
float per closure call, two per SPSA estimate). Every rank then computes the same projected gradient from the
same two numbers and applies the same in-place update: the weights are never sent, and stay bitwise equal
across ranks (:func:`check_in_sync` verifies this with a one-number checksum all-reduce).

Without torchrun (``WORLD_SIZE`` unset or 1) :func:`init` returns (0, 1), initializes nothing, and every
helper here reduces to its single-process behaviour.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

_HASH_MOD = (1 << 61) - 1
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def init(backend: str | None = None) -> tuple[int, int]:
    """(rank, world size). Initializes ``torch.distributed`` when torchrun set ``WORLD_SIZE`` > 1.

    The backend is nccl when CUDA is available (each rank then uses GPU ``LOCAL_RANK``), else gloo; pass
    ``backend`` to choose. Without torchrun (no ``WORLD_SIZE``, or 1) nothing is initialized: (0, 1).
    Calling it again once initialized returns the same values.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


def quiet() -> None:
    """Silence the warnings of a non-main rank (rank 0 shows them once); errors still propagate."""
    if not is_main():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def shard(items: Sequence) -> list:
    """This rank's share of ``items``: ``items[rank::world]`` (all of them in a single process)."""
    return list(items[rank()::world_size()])


def device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.currentdevice())
    return torch.device("cpu")


def weighted_mean(value: float, weight: float) -> float:
    """The mean over ranks of ``value`` weighted by ``weight`` (one all-reduce of two float64 numbers)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([value * weight if weight else 0.0, float(weight)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total, count = t.tolist()
    if count == 0:
        raise ValueError("cannot average an objective over an empty batch")
    return total / count


def gather(items: Sequence, total: int) -> list:
    """Undo :func:`shard`: every rank's ``items`` (its ``[rank::world]`` share of ``total``) in the original
    order, on every rank (``all_gather_object``)."""
    world = world_size()
    if world == 1:
        return list(items)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(items))
    out: list = [None] * total
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def checksum(params: Iterable[torch.Tensor]) -> int:
    """A cheap hash of the bits of ``params`` (in order): equal weights give equal checksums."""
    h = 0
    for i, p in enumerate(params):
        t = p.detach().contiguous()
        bits = t.reshape(-1).view(_INT_OF_SIZE[t.element_size()])
        h = (h * 1_000_003 + int(bits.sum(dtype=torch.int64)) + i) % _HASH_MOD
    return h


def check_in_sync(params: Iterable[torch.Tensor], raise_error: bool = True) -> bool:
    """Whether every rank holds the same weights, from one all-reduce of a checksum (True in one process).

    Raises ``RuntimeError`` when they differ unless ``raise_error`` is False. Every rank must call it.
    """
    if world_size() == 1:
        return True
    h = checksum(params)
    t = torch.tensor([h, -h], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    same = int(t[0]) == -int(t[1])
    if not same and raise_error:
        raise RuntimeError(f"rank {rank()}: weights differ across ranks (checksum {h}; max {int(t[0])}, "
                           f"min {-int(t[1])}): the ranks did not see the same losses or seeds")
    return same
