"""MeZO: the seeded zeroth-order (SPSA) estimator (Malladi et al., 2023), exact in every dtype.

One step per perturbation k: draw a seed, score the loss at x + eps*z and at x - eps*z, and move
x <- x - lr*(g*z + wd*x) with g = (loss_plus - loss_minus) / (2*eps). The noise z is never stored: it is
regenerated from (seed, tensor index, chunk) (:mod:`zo_objectives.noise`). The stored weights are never perturbed:
the closure's forward passes see them perturbed through module hooks (:mod:`.hooks`), so a closure that raises, a
NaN or a KeyboardInterrupt leaves them bitwise as they were. The only write is the shared update
(:class:`~.base.Estimator`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from zo_objectives.estimators.base import Estimator, register_estimator
from zo_objectives.estimators.hooks import Layout, Perturbed

DIFFERENCES = ("central", "forward")


@register_estimator("mezo")
class MeZO(Estimator):
    """Memory-efficient zeroth-order SGD (Malladi et al., 2023) as a ``torch.optim.Optimizer``.

    Differs from a gradient optimizer: ``step(closure)`` calls the closure 2 * ``n_perturbations`` times
    without gradients, and the closure must compute the loss through the modules' forward (the perturbed
    weights exist only there; a tensor read directly is the unperturbed one). Put the model in ``eval()``
    mode. ``state_dict()`` holds the trajectory; ``load_state_dict`` does not move the weights: use
    :func:`~zo_objectives.checkpoint.replay` on the base weights.

    Args (besides :class:`~.base.Estimator`'s):
        eps: for a bf16 model 3e-3, where the rounding of a forward pass swamps the loss differences of smaller
            ones (docs/half_precision.md).
        n_perturbations: SPSA estimates averaged per step.
        difference: "central" (losses at x +- eps z) or "forward" (x and x + eps z).
    """

    settings = ("eps", "n_perturbations", "seed", "difference", "update", "fitness_shaping", "momentum",
                "momentum_window")

    def __init__(self, params: Iterable, *, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, seed: int = 0, noise: str = "table", table_size: int | None = None,
                 chunk_size: int | None = None, difference: str = "central", update: str = "sgd",
                 fitness_shaping: str = "none", momentum: float = 0.0, momentum_window: int = 0,
                 on_nonfinite: str = "raise"):
        if not (isinstance(n_perturbations, int) and n_perturbations >= 1):
            raise ValueError(f"n_perturbations must be an int >= 1, got {n_perturbations!r}")
        if difference not in DIFFERENCES:
            raise ValueError(f"unknown difference {difference!r}; accepted: {', '.join(DIFFERENCES)}")
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, noise=noise,
                         table_size=table_size, chunk_size=chunk_size, update=update, fitness_shaping=fitness_shaping,
                         momentum=momentum, momentum_window=momentum_window, on_nonfinite=on_nonfinite)
        self.n_perturbations, self.difference = n_perturbations, difference
        self._warned_unused = False
        self._kept_layout: Layout | None = None

    def score(self, closure: Callable[[], float], seed: int, scale: float | None,
              layout: Layout | None = None) -> float:
        """The closure's loss, with the weights perturbed by scale*eps*z inside every forward (none if None);
        ``layout``: the step's (see :class:`~.hooks.Layout`)."""
        with torch.no_grad():
            if scale is None:
                return float(closure())
            with Perturbed(self, seed, scale, layout) as perturbed:
                loss = float(closure())
        missed = len(perturbed.targets) - len(perturbed.seen)
        if perturbed.seen and missed and not self._warned_unused:
            self._warned_unused = True
            warnings.warn(f"MeZO: {missed} of {len(perturbed.targets)} trainable tensors were not used by any "
                          "module's forward in the closure (unused, or read directly): their estimates are noise. "
                          "Freeze them, or compute the loss through the model's forward", stacklevel=3)
        return loss

    def step(self, closure: Callable[[], float | torch.Tensor]) -> float:  # type: ignore[override]
        """Run ``n_perturbations`` SPSA estimates and update; return the mean loss seen.

        The weights are written only by the final update, so a closure that raises (KeyboardInterrupt
        included) or a non-finite loss leaves them bitwise unchanged, and the step's seeds are not used up.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss to minimize")
        seeds = self.next_seeds(self.n_perturbations)
        pairs: list[tuple[float, float]] = []
        layout = self.layout()
        with self.in_step():
            for seed in seeds:
                if self.difference == "forward":
                    minus = self.score(closure, seed, None)
                    plus = self.score(closure, seed, 1.0, layout)
                else:
                    plus = self.score(closure, seed, 1.0, layout)
                    minus = self.score(closure, seed, -1.0, layout)
                pairs.append((plus, minus))
        return self.commit(seeds, self.spsa_grads(pairs), sum(map(sum, pairs)) / (2 * len(seeds)), layout.z)

    def layout(self) -> Layout:
        """Where the step's closure calls find each module's work: the last step's layout while it still fits the
        trainable tensors and the modules (walking the modules again each step costs as much as a layer's add)."""
        layout = self._kept_layout
        if layout is None or not layout.fits(self):
            layout = self._kept_layout = Layout(self)
        else:
            layout.new_step()
        return layout
