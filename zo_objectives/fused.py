"""A fused bf16 update on CUDA (Triton): one kernel per chunk that reads the weight, z and the rounding bits once
and writes the weight once, where the eager path takes five kernels (widen, decay, add z, add the bits and mask,
narrow). It computes what the eager path computes, in the same order and rounding, and is used only where a
check at first use on each device found it bitwise equal to the eager path (else the eager path stays).

Without CUDA or Triton nothing here runs: :func:`update` returns False and the caller takes the eager path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

BLOCK = 1024
_checked: dict[torch.device, bool] = {}  # device -> the fused kernel agreed bitwise with the eager path there


@functools.cache
def _kernel():
    """The Triton kernel, compiled on first use (Triton imported only then); None without Triton."""
    try:  # Triton comes with torch's CUDA wheels; a CPU-only install has none
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bf16_update(w_ptr, z_ptr, bits_ptr, n, decay, alpha, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        acc = tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_DECAY:
            acc = acc * decay  # its own rounding, as the eager mul_
        z = tl.load(z_ptr + offsets, mask=mask).to(tl.float32)
        acc = tl.fma(z, alpha, acc)  # the eager add_(z, alpha=...): a + alpha * b, contracted by nvcc
        bits = tl.load(bits_ptr + offsets, mask=mask)
        acc = ((acc.to(tl.int32, bitcast=True) + bits) & -65536).to(tl.float32, bitcast=True)
        tl.store(w_ptr + offsets, acc.to(tl.bfloat16), mask=mask)

    return bf16_update


def _launch(weight: torch.Tensor, z: torch.Tensor, bits: torch.Tensor, decay: float, alpha: float) -> None:
    n = weight.numel()
    _kernel()[((n + BLOCK - 1) // BLOCK,)](weight, z, bits, n, decay, alpha, HAS_DECAY=decay != 1.0, BLOCK=BLOCK,
                                          enable_fp_fusion=False)


def _agrees(device: torch.device, eager: Callable[..., None]) -> bool:
    """Whether the fused kernel gives bitwise what ``eager`` gives, on random weights, z and bits on ``device``."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(3 * BLOCK + 17, generator=gen) * 0.05).to(device, torch.bfloat16)
    z = torch.randn(weight.numel(), generator=gen).to(device, torch.bfloat16)
    bits = torch.randint(0, 1 << 16, (weight.numel(),), generator=gen, dtype=torch.int32).to(device)
    for decay in (1.0, 1.0 - 1e-3 * 0.1):
        fused, reference = weight.clone(), weight.clone()
        _launch(fused, z, bits, decay, -3e-4)
        eager(reference, z, bits, decay, -3e-4)
        if not torch.equal(fused.view(torch.int16), reference.view(torch.int16)):
            return False
    return True


def update(weight: torch.Tensor, z: torch.Tensor, bits: torch.Tensor, decay: float, alpha: float,
           eager: Callable[..., None]) -> bool:
    """``weight <- round(weight * decay + alpha * z)`` (stochastically, with ``bits``) in one kernel, in place, as
    ``eager(weight, z, bits, decay, alpha)`` does it; False (nothing done) where the fused kernel does not apply:
    no Triton, not CUDA, not bf16, or not bitwise equal to ``eager`` on this device."""
    if weight.device.type != "cuda" or weight.dtype != torch.bfloat16 or z.dtype != torch.bfloat16:
        return False
    if not (weight.is_contiguous() and z.is_contiguous() and bits.is_contiguous()):
        return False
    if weight.device not in _checked:
        try:
            _checked[weight.device] = _kernel() is not None and _agrees(weight.device, eager)
        except Exception:  # a Triton that cannot compile here: the eager path
            _checked[weight.device] = False
    if not _checked[weight.device]:
        return False
    _launch(weight, z, bits, decay, alpha)
    return True
