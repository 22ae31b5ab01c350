"""The fused bf16 update (Triton, CUDA only) gives bitwise what the eager path gives; elsewhere it stays out."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from zo_objectives import fused
from zo_objectives.estimators import MeZO
from zo_objectives.noise import eager_update

CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def test_the_eager_path_runs_where_the_fused_kernel_does_not_apply():
    weight = torch.randn(100).to(torch.bfloat16)
    z, bits = torch.randn(100).to(torch.bfloat16), torch.randint(0, 1 << 16, (100,), dtype=torch.int32)
    before = weight.clone()
    assert not fused.update(weight, z, bits, 1.0, -1e-3, eager_update)  # on the CPU: nothing done
    assert torch.equal(weight, before) and not fused._checked


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("n", [1, 1023, 1024, 5000, 1 << 20])
@pytest.mark.parametrize("decay", [1.0, 1.0 - 1e-4])
def test_fused_update_is_bitwise_the_eager_one(n, decay):
    gen = torch.Generator().manual_seed(n)
    weight = (torch.randn(n, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    z = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
    bits = torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32).cuda()
    a, b = weight.clone(), weight.clone()
    assert fused.update(a, z, bits, decay, -3e-3, eager_update)
    eager_update(b, z, bits, decay, -3e-3)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)) and not torch.equal(a, weight)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_training_with_the_fused_update_is_bitwise_the_eager_one(monkeypatch):
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 4)).to("cuda", torch.bfloat16)
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
        opt = MeZO(model.parameters(), lr=1e-2, eps=3e-3, weight_decay=0.1, chunk_size=1 << 12, table_size=1 << 16)
        for _ in range(5):
            opt.step(lambda: model(x).float().pow(2).mean())
        return [p.detach().clone() for p in model.parameters()]

    used = []
    real = fused.update
    monkeypatch.setattr(fused, "update", lambda *a: used.append(real(*a)) or used[-1])
    with_fused = run()
    assert any(used)
    monkeypatch.setattr(fused, "update", lambda *a: False)
    assert all(torch.equal(a, b) for a, b in zip(with_fused, run(), strict=True))
