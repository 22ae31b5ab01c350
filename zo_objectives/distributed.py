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
from typing import Any

import torch
import torch.distributed as dist

from zo_objectives.objectives import Objective

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


def _device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def weighted_mean(value: float, weight: float) -> float:
    """The mean over ranks of ``value`` weighted by ``weight`` (one all-reduce of two float64 numbers)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([value * weight if weight else 0.0, float(weight)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total, count = t.tolist()
    if count == 0:
        raise ValueError("cannot average an objective over an empty batch")
    return total / count


class ShardedObjective(Objective):
    """``objective`` on the whole batch, computed as ``batch[rank::world]`` on each rank and all-reduced.

    Returns the mean of the shards' losses weighted by shard size, identical on every rank. This equals the
    single-process loss on the whole batch (up to float rounding) for objectives that are means over
    examples: accuracy, per-example cross-entropy, exact match, SQuAD EM/F1, mean rewards. Corpus-level
    metrics that are not means over examples, such as macro-F1, become a size-weighted mean of per-shard
    values: a different (noisier) objective whose estimate still agrees on every rank. Objectives with
    sampled predictions (``MetricObjective(samples > 0)``, sampled generation) seed their noise by the
    prompts they see, so a sharded run draws other (equally valid) random numbers than a single-process one;
    both sides of an SPSA estimate still share them. A rank with an empty shard (batch smaller than the
    world) contributes weight 0. If the objective raises on one rank only, the others wait in the all-reduce
    until torchrun ends them.
    """

    def __init__(self, objective: Any):
        self.objective = objective

    def __call__(self, model: torch.nn.Module, batch: Sequence[dict]) -> float:
        part = shard(batch)
        loss = float(self.objective(model, part)) if part else 0.0
        return weighted_mean(loss, len(part))

    def __getattr__(self, name: str) -> Any:  # name, metric, samples, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __repr__(self) -> str:
        return f"ShardedObjective({self.objective!r})"


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


def predict_all(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], batch_size: int = 16) -> list:
    """Predictions for every example, each rank predicting its ``[rank::world]`` share; all ranks get all."""
    from zo_objectives.train import predict_all as local_predict_all

    return gather(local_predict_all(model, predictor, shard(examples), batch_size), len(examples))


def evaluate_model(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metric: Any,
                   batch_size: int = 16) -> float:
    """``zo_objectives.train.evaluate_model`` split across ranks: each rank predicts its share, the predictions are
    all-gathered, and every rank computes the metric on the full set (exact for any metric, macro-F1 too)."""
    from zo_objectives.objectives import references

    return metric(predict_all(model, predictor, examples, batch_size), references(examples))


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
    t = torch.tensor([h, -h], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    same = int(t[0]) == -int(t[1])
    if not same and raise_error:
        raise RuntimeError(f"rank {rank()}: weights differ across ranks (checksum {h}; max {int(t[0])}, "
                           f"min {-int(t[1])}): the ranks did not see the same losses or seeds")
    return same
