"""MeZO: the seeded zeroth-order (SPSA) optimizer, exact in every dtype, and replay of its trajectory.

One step per perturbation k: draw a seed, score the loss at x + eps*z and at x - eps*z, and move
x <- x - lr*(g*z + wd*x) with g = (loss_plus - loss_minus) / (2*eps). The noise z is never stored: it is
regenerated from (seed, tensor index, chunk).

The stored weights are never perturbed. While the closure runs, each module's forward sees its trainable
weights as a fresh tensor w + eps*z (built chunk by chunk from the regenerated noise, dropped when the module
returns; an embedding and an LM head get the perturbation added to their output instead, without a copy), so
at most one layer's perturbed copy exists at a time, and a closure that raises, a NaN or a KeyboardInterrupt
leaves the weights bitwise as they were. The only write is the update. In bf16/fp16 it is
computed in fp32 per chunk and stochastically rounded, with random bits regenerated from the step's seed:
the expected change equals the fp32 update (round-to-nearest would drop most updates smaller than half an
ulp), and resume and ``replay`` stay bitwise.
"""

from __future__ import annotations

import bisect
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.optim import Optimizer

MASK64 = (1 << 64) - 1
NOISE_KINDS = ("table", "gaussian", "rademacher")
NONFINITE_POLICIES = ("raise", "skip")
DIFFERENCES = ("central", "forward")
UPDATES = ("sgd", "sign", "normalized")
RMS_BETA = 0.99  # decay of the running mean square that "normalized" updates divide by
SHAPINGS = ("none", "rank")
SCHEDULES = ("constant", "linear", "cosine")
HALF = (torch.bfloat16, torch.float16)
ROUNDING_SALT = 0x5EED  # separates the rounding bits' offsets from the noise's


def mix(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 finalizer), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 31
    return h >> 1


class Noise:
    """Regenerates z for (seed, tensor index) in bounded chunks, never allocating a weight-sized buffer.

    ``table``: slices of one seeded, standardized Gaussian vector of ``table_size`` values at offsets hashed
    from (seed, tensor, chunk), as in Salimans et al. (2017): a memory-bound read instead of a random draw.
    ``gaussian``: exact N(0, 1) per chunk from a private ``torch.Generator``. ``rademacher``: +-1 likewise.
    """

    def __init__(self, kind: str = "table", table_size: int = 1 << 22, table_seed: int = 0,
                 chunk_size: int = 1 << 18):
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; accepted: {', '.join(NOISE_KINDS)}")
        if table_size < 2 * chunk_size:
            raise ValueError(f"noise table_size must be at least 2 * chunk_size = {2 * chunk_size}")
        self.kind, self.table_size, self.table_seed, self.chunk_size = kind, table_size, table_seed, chunk_size
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key, base = (device, dtype), (device, torch.float32)
        if base not in self._tables:
            gen = torch.Generator().manual_seed(self.table_seed)
            table = torch.randn(self.table_size, generator=gen)
            mean, std = table.double().mean().item(), table.double().std().item()
            table.sub_(mean).div_(std)  # exactly standardized, built in place: no temporary copies
            self._tables[base] = table.to(device)
        if key not in self._tables:
            self._tables[key] = self._tables[base].to(dtype)
        return self._tables[key]

    def _offset(self, length: int, *key: int) -> int:
        return mix(*key) % (self.table_size - length + 1)

    def _wide_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table rounded to ``dtype``, held in fp32, for a half-precision update on the CPU: adding it to the
        fp32 buffer is a same-dtype kernel, twice as fast there as adding the half-precision table."""
        key = (device, dtype, torch.float32)
        if key not in self._tables:
            self._tables[key] = self._table(device, dtype).float()
        return self._tables[key]

    def chunks(self, seed: int, index: int, flat: torch.Tensor,
               wide: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice of ``flat``, z for that slice); the same arguments always yield the same z, in
        ``flat``'s precision (``wide``, table noise only: the same values in fp32)."""
        n, c = flat.numel(), self.chunk_size
        if self.kind == "table":
            table = self._wide_table(flat.device, flat.dtype) if wide else self._table(flat.device, flat.dtype)
            for k, start in enumerate(range(0, n, c)):
                length = min(c, n - start)
                offset = self._offset(length, seed, index, k)
                yield slice(start, start + length), table[offset:offset + length]
            return
        buffer = torch.empty(min(c, n), device=flat.device, dtype=flat.dtype)  # one chunk, per call
        gen = torch.Generator(device=flat.device).manual_seed(mix(seed, index))
        for start in range(0, n, c):
            z = buffer[: min(c, n - start)]
            if self.kind == "gaussian":
                z.normal_(generator=gen)
            else:
                z.random_(0, 2, generator=gen).mul_(2).sub_(1)
            yield slice(start, start + z.numel()), z

    def offsets(self, seed: int, index: int, n: int) -> list[int]:
        """Where each chunk of a tensor of ``n`` values reads the table (table noise): for :meth:`gather` and
        :meth:`span`, computed once per tensor."""
        c = self.chunk_size
        return [self._offset(min(c, n - start), seed, index, k) for k, start in enumerate(range(0, n, c))]

    def gather(self, flat: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """z at the given positions of ``flat`` (``offsets`` as a tensor): the values ``chunks`` yields there."""
        c = self.chunk_size
        return self._table(flat.device, flat.dtype)[offsets[positions // c] + positions % c]

    def span(self, flat: torch.Tensor, offsets: list[int], start: int, stop: int) -> torch.Tensor:
        """z of ``flat[start:stop]``: the table slices ``chunks`` yields there, joined."""
        c, table = self.chunk_size, self._table(flat.device, flat.dtype)
        pieces = [table[offsets[k] + max(start, k * c) - k * c: offsets[k] + min(stop, (k + 1) * c) - k * c]
                  for k in range(start // c, (stop - 1) // c + 1)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def rounding_bits(self, seed: int, index: int, chunk: int, length: int, device: torch.device) -> torch.Tensor:
        """16 random bits per element (int32 in [0, 65536)) for stochastic rounding, regenerated from the
        seed: the low mantissa bits of the fp32 table at a hashed offset (a read, not a random draw)."""
        key = (device, torch.int32)
        if key not in self._tables:
            self._tables[key] = self._table(device, torch.float32).view(torch.int32) & 0xFFFF
        offset = self._offset(length, seed, index, chunk, ROUNDING_SALT)
        return self._tables[key][offset:offset + length]

    def config(self) -> dict:
        return {"noise": self.kind, "table_size": self.table_size, "table_seed": self.table_seed,
                "chunk_size": self.chunk_size}


def round_stochastic(value: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``value`` (fp32, overwritten) rounded to ``dtype`` up or down with probability proportional to its
    distance from each neighbour, so that the expected result is ``value`` (exactly in bf16; in fp16 to 2^-13
    of the grid spacing), written into ``out`` (bf16 or fp16); ``bits`` are 16 uniform random bits per element."""
    if out.dtype == torch.bfloat16:  # bf16 is the top half of fp32: add random low bits, then truncate them
        value.view(torch.int32).add_(bits).bitwise_and_(-65536)
        return out.copy_(value)
    # fp16: the grid spacing at |value| is 2^(exponent - 10), with subnormals below 2^-14. In units of it, value
    # has 13 fractional bits (fp32's 23 - 10), so a 13-bit uniform u makes floor(value + u) exact and unbiased
    _, exponent = torch.frexp(value)
    spacing = torch.ldexp(torch.ones_like(value), exponent.sub_(1).clamp_(min=-14).sub_(10))
    value.div_(spacing).add_(bits.bitwise_right_shift(3).to(value.dtype).mul_(2.0**-13)).floor_().mul_(spacing)
    return out.copy_(value)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (main thread only), so an update is never half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda num, frame: caught.append(num)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


@contextmanager
def _normal_no_grad():
    """Build normal tensors (not inference-mode ones) without autograd history."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class _Perturbed:
    """While active, every module forward sees its trainable weights as ``w + scale * eps * z``, through
    process-wide module hooks; the stored weights are never written.

    Usually the module's weight is swapped for a temporary perturbed copy. With table noise, two large weights are
    perturbed through their output instead, so that no copy of them is made: an embedding's output gets
    ``eps * z`` of the rows it looked up (the same values, bitwise), and a linear layer applied to at most
    ``SMALL_INPUT`` rows (an LM head under ``logits_to_keep``) gets ``eps * x @ z.T``, by blocks of rows."""

    SMALL_INPUT = 64  # rows of input under which x @ z.T (a matmul that small) is cheaper than copying the weight
    GATHER = 1 << 18  # values of z gathered at a time for an embedding's output: bounds the index buffers

    def __init__(self, opt: MeZO, seed: int, scale: float):
        self.opt, self.seed, self.alpha = opt, seed, scale * opt.eps
        self.targets = {id(p): index for index, p, _ in opt._params()}
        self.seen: set[int] = set()
        self.swapped: dict[int, tuple[torch.nn.Module, list]] = {}  # id(module) -> (module, [(name, original)])
        self.through_output: dict[int, tuple[int, torch.Tensor]] = {}  # id(module) -> (index, weight)

    def _perturb(self, index: int, p: torch.Tensor) -> torch.Tensor:
        flat, noise = p.detach().view(-1), self.opt.noise
        chunks = noise.chunks(self.seed, index, flat)
        if 0 < flat.numel() <= noise.chunk_size:  # one chunk: a single kernel
            out = torch.add(flat, next(chunks)[1], alpha=self.alpha)
        else:
            out = torch.empty_like(flat)
            for where, z in chunks:
                torch.add(flat[where], z, alpha=self.alpha, out=out[where])
        return torch.nn.Parameter(out.view_as(p), requires_grad=p.requires_grad)

    def _by_output(self, module: torch.nn.Module, name: str, args) -> bool:
        if name != "weight" or self.opt.noise.kind != "table" or not args:
            return False
        if type(module) is torch.nn.Embedding:
            return module.max_norm is None  # max_norm renormalizes the looked-up rows of the weight itself
        if type(module) is torch.nn.Linear and isinstance(args[0], torch.Tensor):
            return args[0].numel() // max(1, args[0].shape[-1]) <= self.SMALL_INPUT
        return False

    def _pre(self, module: torch.nn.Module, args) -> None:
        swaps = []
        for name, p in module._parameters.items():
            index = self.targets.get(id(p)) if p is not None else None
            if index is None:
                continue
            self.seen.add(index)
            if self._by_output(module, name, args):
                self.through_output[id(module)] = (index, p)
            else:
                swaps.append((name, index, p))
        if swaps:
            self.swapped[id(module)] = (module, [(name, p) for name, _, p in swaps])
            # A normal (not inference-mode) Parameter like the original: torch picks matmul kernels by it. As a
            # plain or inference tensor, SmolLM2's tied lm_head took a batched matmul over an 8x expanded copy of
            # its weight (1.1 s instead of 9 ms in bf16). The contexts are entered only when needed: they cost
            # as much as the kernel launch of a small layer's perturbation
            needed = torch.is_inference_mode_enabled() or torch.is_grad_enabled()
            with _normal_no_grad() if needed else nullcontext():
                for name, index, p in swaps:
                    module._parameters[name] = self._perturb(index, p)
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            if not self.opt._warned_training:
                self.opt._warned_training = True
                warnings.warn("MeZO: dropout is active (the model is in training mode): it makes the two losses of "
                              "an estimate differ. Call model.eval() first", stacklevel=2)

    def _post(self, module: torch.nn.Module, args, output):
        swapped = self.swapped.pop(id(module), None)
        if swapped is not None:
            module._parameters.update(swapped[1])
        if id(module) not in self.through_output:
            return None
        index, p = self.through_output.pop(id(module))
        flat, noise, width = p.detach().view(-1), self.opt.noise, p.shape[1]
        offsets = noise.offsets(self.seed, index, flat.numel())
        if isinstance(module, torch.nn.Embedding):  # output[i] = w[ids[i]]: add z of that row
            ids, out, rows = args[0].reshape(-1), output.view(-1, width), max(1, self.GATHER // width)
            columns, where = torch.arange(width, device=p.device), torch.tensor(offsets, device=p.device)
            for start in range(0, ids.numel(), rows):
                positions = ids[start:start + rows, None] * width + columns
                out[start:start + rows].add_(noise.gather(flat, where, positions), alpha=self.alpha)
            return output
        # output = x @ w.T: add x @ z.T, a block of z's rows at a time. x as a contiguous 2-D matrix: a strided 3-D
        # one (h[:, -1:]) sends torch's matmul to a batched kernel that copies z once per row of x
        x = args[0].reshape(-1, width).contiguous()
        rows = max(1, noise.chunk_size // width)  # at most a noise chunk of z at a time: bounded buffers
        for start in range(0, p.shape[0], rows):
            stop = min(start + rows, p.shape[0])
            z = noise.span(flat, offsets, start * width, stop * width).view(stop - start, width)
            correction = torch.nn.functional.linear(x, z).view(*output.shape[:-1], stop - start)
            output[..., start:stop].add_(correction, alpha=self.alpha)
        return output

    def __enter__(self) -> _Perturbed:
        from torch.nn.modules import module as nn_module

        self.handles = [nn_module.register_module_forward_pre_hook(self._pre),
                        nn_module.register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for module, originals in self.swapped.values():  # modules whose forward raised before its hook ran
            module._parameters.update(originals)
        self.swapped.clear()


class MeZO(Optimizer):
    """Memory-efficient zeroth-order SGD (Malladi et al., 2023) as a ``torch.optim.Optimizer``.

    Differs from a gradient optimizer: ``step(closure)`` calls the closure 2 * ``n_perturbations`` times
    without gradients, and the closure must compute the loss through the modules' forward (the perturbed
    weights exist only there; a tensor read directly is the unperturbed one). Put the model in ``eval()``
    mode. ``state_dict()`` holds the trajectory; ``load_state_dict`` does not move the weights: use
    :func:`replay` on the base weights.

    Args:
        params: parameters or param groups, as for any torch optimizer. Groups may set ``lr``,
            ``weight_decay`` and ``decay_1d`` (decay tensors with one dimension: biases and norm weights;
            off by default, as in MeZO).
        lr: learning rate. eps: perturbation scale (one value for all groups); for a bf16 model 3e-3, where
            the rounding of a forward pass swamps the loss differences of smaller ones (docs/half_precision.md).
        weight_decay: decoupled weight decay. n_perturbations: SPSA estimates averaged per step.
        seed: seeds the stream of step seeds. noise: "table" (default), "gaussian" or "rademacher".
        table_size, chunk_size: values in the noise table, and elements per chunk of every pass over a tensor
            (the bound on its buffers). Default 2^22 and 2^18, or 2^25 and 2^24 when the parameters are on a GPU,
            where each chunk's kernel launches dominate (a 1.1B model's step: 2.8 x two forward passes instead of
            18.5, BENCHMARKS.md). A checkpoint keeps them, so replay draws the same noise on any device.
        difference: "central" (losses at x +- eps z) or "forward" (x and x + eps z).
        update: "sgd" (move by g), "sign" (experimental: move by sign(g)) or "normalized" (move by g divided by
            the running root mean square of the estimates so far, bias-corrected as in Adam: the step length no
            longer depends on the scale of the loss, so one lr suits objectives on different scales).
        fitness_shaping: "none" or "rank" (experimental): replace the 2n losses of a step by their centered
            ranks (as evolution strategies do), robust to the scale and outliers of a reward. The estimate is
            then the rank difference itself, in [-1, 1], not divided by eps: scale-free like ``update="sign"``,
            so the lr is the largest step (zo-tune's default for it: 1e-4, as for sign and normalized updates).
        momentum, momentum_window: (experimental) heavy-ball momentum without a buffer: each step also moves by
            momentum**lag times the estimates of the previous ``momentum_window - 1`` steps, regenerated from
            their seeds.
        on_nonfinite: "raise" or "skip" (warn and leave the weights unchanged) on a NaN/inf loss.
    """

    def __init__(self, params: Iterable, *, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, seed: int = 0, noise: str = "table", table_size: int | None = None,
                 chunk_size: int | None = None, difference: str = "central", update: str = "sgd",
                 fitness_shaping: str = "none", momentum: float = 0.0, momentum_window: int = 0,
                 on_nonfinite: str = "raise"):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(n_perturbations, int) and n_perturbations >= 1):
            raise ValueError(f"n_perturbations must be an int >= 1, got {n_perturbations!r}")
        if not 0.0 <= momentum < 1.0 or momentum_window < 0 or (momentum > 0) != (momentum_window > 1):
            raise ValueError(f"momentum must be in [0, 1) with momentum_window > 1 (or 0 and 0), got {momentum}, "
                             f"{momentum_window}")
        for name, value, accepted in (("difference", difference, DIFFERENCES), ("update", update, UPDATES),
                                      ("fitness_shaping", fitness_shaping, SHAPINGS),
                                      ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)):
            if value not in accepted:
                raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, decay_1d=False))
        self.eps, self.n_perturbations, self.seed = eps, n_perturbations, seed
        self.difference, self.update, self.on_nonfinite = difference, update, on_nonfinite
        self.fitness_shaping, self.momentum, self.momentum_window = fitness_shaping, momentum, momentum_window
        # Each chunk of a pass costs a few kernel launches: on a GPU, fewer and larger chunks (and a table to match)
        on_gpu = any(p.is_cuda for group in self.param_groups for p in group["params"])
        self.noise = Noise(noise, table_size=table_size or (1 << 25 if on_gpu else 1 << 22), table_seed=seed,
                           chunk_size=chunk_size or (1 << 24 if on_gpu else 1 << 18))
        self.num_perturbations_done = 0
        self.trajectory: list[dict] = []
        self._warned_training = self._warned_unused = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_contiguous():
                raise ValueError("MeZO needs contiguous parameters; call .contiguous() on the model first")

    def _params(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield index, p, group
                index += 1

    def _score(self, closure: Callable[[], float], seed: int, scale: float | None) -> float:
        """The closure's loss, with the weights perturbed by scale*eps*z inside every forward (none if None)."""
        with torch.no_grad():
            if scale is None:
                return float(closure())
            with _Perturbed(self, seed, scale) as perturbed:
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
        n = self.n_perturbations
        seeds = [mix(self.seed, self.num_perturbations_done + k) for k in range(n)]
        pairs: list[tuple[float, float]] = []
        for seed in seeds:
            if self.difference == "forward":
                minus = self._score(closure, seed, None)
                plus = self._score(closure, seed, 1.0)
            else:
                plus = self._score(closure, seed, 1.0)
                minus = self._score(closure, seed, -1.0)
            pairs.append((plus, minus))
        grads = self._projected_grads(pairs)
        record = {"seeds": seeds, "grads": grads, "loss": sum(map(sum, pairs)) / (2 * n),
                  "lrs": [g["lr"] for g in self.param_groups]}
        if self.update == "normalized":
            record["grads"], record["second_moment"] = self._normalized(grads)
        self._apply(record)
        return record["loss"]

    def _terms(self, record: dict) -> list[tuple[int, float]]:
        """(seed, multiple of -lr*z) of every move a record makes: its estimates and the momentum terms
        regenerated from the previous records."""
        records = [(1.0, record)] + [(self.momentum**lag, self.trajectory[-lag])
                                     for lag in range(1, min(self.momentum_window, len(self.trajectory) + 1))]
        return [(seed, weight * grad / len(r["seeds"])) for weight, r in records
                for seed, grad in zip(r["seeds"], r["grads"]) if grad]

    @torch.no_grad()
    def _apply(self, record: dict) -> None:
        """The update, the only write to the weights: one pass per tensor, all terms summed in the weight's
        precision (fp32 for half-precision weights, then stochastically rounded); then the record is kept."""
        terms = self._terms(record)
        buffers: dict[torch.device, torch.Tensor] = {}  # one fp32 chunk per device for half-precision weights
        with signals_deferred():
            for index, p, group in self._params():
                lr = group["lr"]
                wd = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
                if not lr or not (terms or wd):
                    continue  # nothing moves: the weights stay bitwise as they are
                flat, half = p.detach().view(-1), p.dtype in HALF
                if half and p.device not in buffers:
                    size = min(self.noise.chunk_size, max(q.numel() for _, q, _ in self._params()))
                    buffers[p.device] = torch.empty(size, device=p.device, dtype=torch.float32)
                # z as fp32 values on the CPU, where adding a half tensor to an fp32 one is a slow mixed-dtype
                # kernel; on a GPU reading half the bytes is faster and the sum is the same
                wide = half and flat.device.type == "cpu"
                streams = [self.noise.chunks(seed, index, flat, wide=wide) for seed, _ in terms]
                for k, where in enumerate(slice(s, s + self.noise.chunk_size)
                                          for s in range(0, flat.numel(), self.noise.chunk_size)):
                    zs = [next(stream)[1] for stream in streams]
                    acc = flat[where]
                    if half:
                        acc = buffers[p.device][:acc.numel()].copy_(acc)
                    if wd:
                        acc.mul_(1.0 - lr * wd)
                    for z, (_, coeff) in zip(zs, terms):
                        acc.add_(z, alpha=-lr * coeff)
                    if half:
                        bits = self.noise.rounding_bits(record["seeds"][0], index, k, acc.numel(), acc.device)
                        round_stochastic(acc, bits, out=flat[where])
            self.trajectory.append(record)
            self.num_perturbations_done += len(record["seeds"])

    def _projected_grads(self, pairs: list[tuple[float, float]]) -> list[float | None]:
        """(plus - minus) / (2 eps) per perturbation (eps for forward differences); when shaping, the difference
        of the centered ranks (in [-1, 1]: ranks have no scale for eps to divide)."""
        scale = 1.0 if self.fitness_shaping == "rank" else self.eps if self.difference == "forward" else 2 * self.eps
        for plus, minus in pairs:
            if not (math.isfinite(plus) and math.isfinite(minus)):
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(f"non-finite loss (plus={plus}, minus={minus}); the weights are "
                                             "unchanged. Pass on_nonfinite='skip' (CLI: --on-nonfinite skip) to "
                                             "skip such estimates")
                warnings.warn(f"skipping an estimate with non-finite loss (plus={plus}, minus={minus})",
                              stacklevel=3)
        if self.fitness_shaping == "rank":
            ranked = sorted(v for pair in pairs for v in pair if math.isfinite(v))
            top = max(1, len(ranked) - 1)

            def utility(v: float) -> float:  # centered rank in [-0.5, 0.5]; ties share their mean rank
                if not math.isfinite(v):
                    return v
                return (bisect.bisect_left(ranked, v) + bisect.bisect_right(ranked, v) - 1) / (2 * top) - 0.5

            pairs = [(utility(p), utility(m)) for p, m in pairs]
        grads: list[float | None] = []
        for plus, minus in pairs:
            grad = (plus - minus) / scale
            if not math.isfinite(grad):
                grads.append(None)
            elif self.update == "sign":
                grads.append(math.copysign(1.0, grad) if grad else 0.0)
            else:
                grads.append(grad)
        return grads

    def _normalized(self, grads: list[float | None]) -> tuple[list[float | None], list]:
        """Each estimate divided by the bias-corrected running RMS of all estimates up to it, and the new
        [mean square, count]; the previous ones are the last trajectory record's (so resume and replay,
        which restore the trajectory, restore them too)."""
        mean_square, count = self.trajectory[-1]["second_moment"] if self.trajectory else (0.0, 0)
        out: list[float | None] = []
        for grad in grads:
            if grad is None:
                out.append(None)
                continue
            count += 1
            mean_square = RMS_BETA * mean_square + (1.0 - RMS_BETA) * grad * grad
            rms = math.sqrt(mean_square / (1.0 - RMS_BETA**count))
            out.append(grad / rms if rms > 0 else 0.0)
        return out, [mean_square, count]

    def config(self) -> dict:
        """Everything besides the weights and the trajectory that a replay needs."""
        return {"eps": self.eps, "n_perturbations": self.n_perturbations, "seed": self.seed,
                "difference": self.difference, "update": self.update, "fitness_shaping": self.fitness_shaping,
                "momentum": self.momentum, "momentum_window": self.momentum_window, **self.noise.config()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mezo"] = {**self.config(), "num_perturbations_done": self.num_perturbations_done,
                         "params": _describe(p for group in self.param_groups for p in group["params"]),
                         "trajectory": [dict(r) for r in self.trajectory]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo")
        mismatched = {k: (v, mezo[k]) for k, v in self.config().items() if mezo.get(k) != v}
        if mismatched:
            raise ValueError(f"optimizer settings differ from the checkpoint's (now, saved): {mismatched}")
        super().load_state_dict(state_dict)
        self.num_perturbations_done = mezo["num_perturbations_done"]
        self.trajectory = [dict(r) for r in mezo["trajectory"]]

    def replay_record(self, record: dict) -> None:
        """Apply one trajectory record to the weights with the same arithmetic as training (bitwise)."""
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        self._apply(dict(record))


def _describe(params: Iterable[torch.Tensor]) -> list[list]:
    """[dtype, shape] of each parameter: what replay checks the parameters it is given against."""
    return [[str(p.dtype).removeprefix("torch."), list(p.shape)] for p in params]


def replay(params: Iterable, state: dict, steps: int | None = None) -> MeZO:
    """Rebuild tuned weights in place from the base weights and a ``MeZO.state_dict()``.

    ``params`` must be the same parameters (same order, same groups) the optimizer was built with, holding
    the base weights: their count, dtypes and shapes (and, when the state carries ``base_sha256``, the
    weights' checksum) are checked first, and a mismatch is a ValueError with the weights untouched. Returns
    an optimizer positioned after the replayed steps, ready to continue training.
    """
    if not (isinstance(state, dict) and "mezo" in state):
        raise TypeError("replay needs a MeZO.state_dict() (a dict with a 'mezo' entry: the settings and the "
                        f"trajectory), got {type(state).__name__}")
    mezo = state["mezo"]
    keys = ("eps", "n_perturbations", "seed", "difference", "update", "fitness_shaping", "momentum", "momentum_window")
    config = {k: mezo[k] for k in keys}
    opt = MeZO(params, noise=mezo["noise"], table_size=mezo["table_size"],
               chunk_size=mezo["chunk_size"], **config)
    given = [p for group in opt.param_groups for p in group["params"]]
    described = mezo.get("params") or []  # [dtype, shape] of each (a state_dict() of an older version: none)
    count = len(described) or sum(len(g["params"]) for g in state.get("param_groups", []))
    if count and count != len(given):
        raise ValueError(f"replay: the state is of {count} parameters, got {len(given)}")
    for i, (now, then) in enumerate(zip(_describe(given), described)):
        if now != then:
            raise ValueError(f"replay: parameter {i} is {now[0]} {tuple(now[1])} but the state's is {then[0]} "
                             f"{tuple(then[1])}: not the parameters the optimizer was built with")
    if mezo.get("base_sha256"):
        from zo_objectives.train import weights_sha256  # (train imports this module)

        if weights_sha256(p for p in given if p.requires_grad) != mezo["base_sha256"]:
            raise ValueError("replay: the parameters do not hold the base weights the state was made from")
    if "param_groups" in state:
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    for record in mezo["trajectory"][:steps]:
        opt.replay_record(record)
    return opt


def make_scheduler(optimizer: Optimizer, kind: str, total_steps: int,
                   last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A constant, linear-decay or cosine-decay learning-rate schedule over ``total_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; accepted: {', '.join(SCHEDULES)}")
    shapes = {"constant": lambda t: 1.0, "linear": lambda t: 1.0 - t,
              "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t))}
    shape = shapes[kind]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: shape(min(step, total_steps) / total_steps))
    with warnings.catch_warnings():  # fast-forwarding a resumed run steps the schedule before the optimizer
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(last_step):
            scheduler.step()
    return scheduler
