"""MeZO's reference step (Malladi et al., 2023), re-implemented from the paper's description for comparison.

Per step: ``torch.manual_seed(seed)``, then for each trainable parameter draw ``z ~ N(0, 1)`` of its shape
from the global RNG and move it out of place, ``p.data = p.data + scale * eps * z``; scale +1, closure,
-2, closure, +1 (restore); then a separate update pass that re-seeds and regenerates the same z:
``p.data = p.data - lr * (g * z + wd * p.data)`` with ``g = (loss_plus - loss_minus) / (2 eps)`` and no weight
decay on biases and layer norms. Four passes over the weights, each allocating a fresh z per tensor (and a
fresh output tensor per update), and one global-RNG draw per pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def _perturb(params: list[tuple[str, torch.nn.Parameter]], seed: int, scale: float, eps: float) -> None:
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data + scale * eps * z


def _decays(name: str) -> bool:
    """Weight decay skips biases and norms (MeZO names "layer_norm"/"layernorm"; Llama adds "model.norm")."""
    return "bias" not in name and "norm" not in name


@torch.no_grad()
def reference_step(model: torch.nn.Module, closure: Callable[[], float | torch.Tensor], lr: float, eps: float,
                   seed: int, weight_decay: float = 0.0) -> float:
    """One MeZO step as the reference implementation does it; returns the mean of the two losses."""
    params = _trainable(model)
    _perturb(params, seed, 1.0, eps)
    plus = float(closure())
    _perturb(params, seed, -2.0, eps)
    minus = float(closure())
    _perturb(params, seed, 1.0, eps)
    grad = (plus - minus) / (2 * eps)
    torch.manual_seed(seed)
    for name, p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
        wd = weight_decay if _decays(name) else 0.0
        p.data = p.data - lr * (grad * z + wd * p.data)
    return (plus + minus) / 2
