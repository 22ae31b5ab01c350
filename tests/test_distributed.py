"""Data-parallel MeZO (zo_objectives.distributed): two CPU processes with gloo train a toy model and end with
bitwise identical weights that match a single-process run on the whole batch; the single-process path."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from metrics import get_metric
from zo_objectives import Objective, distributed, make_objective
from zo_objectives.estimators import MeZO
from zo_objectives.evaluate import evaluate_model, sharded_evaluate_model
from zo_objectives.objectives import ShardedObjective
from zo_objectives.train import train

WORLD = 2
STEPS, BATCH = 4, 5  # an odd batch: uneven shards (3 and 2 examples) exercise the size weighting
GEN = torch.Generator().manual_seed(1)
DATA = [{"x": torch.randn(4, generator=GEN, dtype=torch.float64), "label": int(torch.randint(3, (1,), generator=GEN))}
        for _ in range(12)]


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def toy_cross_entropy(model: torch.nn.Module, batch: list[dict]) -> float:
    """A per-example mean (so sharding is exact): cross-entropy of the labels."""
    with torch.no_grad():
        logits = model(torch.stack([ex["x"] for ex in batch]))
        return float(F.cross_entropy(logits, torch.tensor([ex["label"] for ex in batch])))


class ToyPredictor:
    def predict(self, model: torch.nn.Module, batch: list[dict]) -> list[int]:
        with torch.no_grad():
            return model(torch.stack([ex["x"] for ex in batch])).argmax(-1).tolist()


def run_mezo(model: torch.nn.Module, objective) -> MeZO:
    opt = MeZO(list(model.parameters()), lr=0.05, eps=1e-3, n_perturbations=2, seed=3, table_size=1 << 21)
    train(model, opt, objective, DATA, steps=STEPS, batch_size=BATCH, seed=7, progress=False)
    return opt


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    assert distributed.init(backend="gloo") == (rank, WORLD)
    try:
        model = toy_model()
        params = list(model.parameters())
        opt = run_mezo(model, ShardedObjective(toy_cross_entropy))
        assert distributed.check_in_sync(params)
        accuracy = sharded_evaluate_model(model, ToyPredictor(), DATA[:7], get_metric("accuracy"), batch_size=2)
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():  # a one-ulp difference on one rank is caught on every rank
            if rank == 1:
                params[0].view(-1)[0] = torch.nextafter(params[0].view(-1)[0], torch.tensor(1.0, dtype=torch.float64))
        diverged = not distributed.check_in_sync(params, raise_error=False)
        torch.save({"weights": weights,
                    "losses": [r["loss"] for r in opt.trajectory], "accuracy": accuracy, "diverged": diverged,
                    "main": distributed.is_main()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux" or not dist.is_gloo_available(), reason="needs fork and gloo")
def test_two_ranks_match_each_other_and_a_single_process(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch and the package per rank)
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = toy_model()
    initial = [p.detach().clone() for p in single.parameters()]
    opt = run_mezo(single, toy_cross_entropy)
    single_accuracy = evaluate_model(single, ToyPredictor(), DATA[:7], get_metric("accuracy"), batch_size=2)

    assert [r["main"] for r in ranks] == [True, False]
    assert all(r["diverged"] for r in ranks)
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(a, b)  # bitwise: the same losses on every rank give the same updates
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx([r["loss"] for r in opt.trajectory], rel=1e-12)
    for a, b, w0 in zip(ranks[0]["weights"], single.parameters(), initial):
        assert torch.allclose(a, b.detach(), rtol=0, atol=1e-10)
        assert not torch.equal(a, w0)  # training moved every tensor
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"] == single_accuracy


def test_single_process_path(monkeypatch):
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", value)
        assert distributed.init() == (0, 1)
        assert not dist.is_initialized()
    assert distributed.is_main() and distributed.shard(DATA) == DATA
    model = toy_model()
    sharded = ShardedObjective(toy_cross_entropy)
    assert sharded(model, DATA[:5]) == toy_cross_entropy(model, DATA[:5])
    assert isinstance(sharded, Objective) and make_objective(sharded, ToyPredictor()) is sharded  # not a metric
    assert distributed.check_in_sync(model.parameters())
    metric = get_metric("accuracy")
    assert sharded_evaluate_model(model, ToyPredictor(), DATA, metric, 5) == evaluate_model(
        model, ToyPredictor(), DATA, metric, 5)
    assert distributed.checksum(model.parameters()) == distributed.checksum(toy_model().parameters())
    with torch.no_grad():
        model[0].bias[0] += 1e-12
    assert distributed.checksum(model.parameters()) != distributed.checksum(toy_model().parameters())
