"""Perturbing inside the forward: what both estimators' closures see, with the stored weights never written.

While a closure runs under :class:`Perturbed` (MeZO) or :class:`Members` (populations), process-wide module hooks
show each module's forward its trainable weights perturbed, and put the stored ones back when it returns. The
weights themselves are never written while scoring: a closure that raises, a NaN or a KeyboardInterrupt leaves them
bitwise as they were (:class:`Hooks` puts back whatever is still swapped when the block ends).

MeZO: each module's forward sees its trainable weights as a fresh tensor w + eps*z (built chunk by chunk from the
regenerated noise, dropped when the module returns; an embedding and an LM head get the perturbation added to their
output instead, without a copy), so at most one layer's perturbed copy exists at a time.

Populations: the closure runs the batch repeated once per member, the rows grouped by member (member i's rows are
the i-th block of every forward's rows), and each member's perturbation is added to its rows only, so one shared
matmul x W^T serves every member and the extra work is thin matmuls:

- a linear layer: ``output[rows of i] += s_i * eps * ((x_i @ B_k) @ A_k^T) / sqrt(r)`` (and ``s_i * eps * z_k``
  for its bias), an embedding: ``+= s_i * eps * A_k[ids] @ B_k^T / sqrt(r)``;
- any other module's 1-D weight (an RMSNorm's) is swapped, while the module runs, for one row of weights per row
  of input (shape (rows, 1, ..., d)), which broadcasts as the weight did. Other trainable tensors are refused.

No weight-sized copy is made per member.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import torch
from torch.nn.modules import module as nn_module

from zo_objectives.noise import Noise


class Perturbing(Protocol):
    """What the hooks ask of an estimator (:class:`~zo_objectives.estimators.base.Estimator` has it all)."""

    noise: Noise
    eps: float
    warned_training: bool  # the dropout warning is given once per estimator

    def trainable(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """(index, tensor, its param group) of every trainable tensor, the index counting all tensors."""


class LowRank(Perturbing, Protocol):
    """What :class:`Members` asks of a population estimator: each member's factors of each tensor."""

    perturbation_rank: int

    def factor_shape(self, p: torch.Tensor) -> tuple[int, int]: ...

    def factors(self, seed: int, index: int, p: torch.Tensor,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

# modules whose functional form checks the weight's shape: a weight per row of input cannot stand in for theirs
SHAPE_CHECKED = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
CACHE_SHARE = 0.02  # factors kept between the forwards of one scoring, as a share of the trainable values


class Hooks:
    """While active (``with``), a subclass's ``_pre`` runs before every module's forward and its ``_post`` after it
    (even when the forward raises), through process-wide module hooks. A weight swapped in with :meth:`_put` is put
    back when its module returns, and at the latest when the block ends (a KeyboardInterrupt skips the hooks)."""

    def __init__(self, opt: Perturbing, targets: dict[int, int]):
        self.opt, self.targets = opt, targets  # targets: id(trainable tensor) -> its index
        self.swapped: dict[int, list] = {}  # id(module) -> [(module, name, original)] put back when it returns

    def _put(self, module: torch.nn.Module, swaps: list[tuple[torch.nn.Module, str, torch.Tensor]]) -> None:
        """Put each (sub, name, tensor) of ``swaps`` in place of ``sub``'s parameter ``name`` until ``module``
        returns."""
        originals = self.swapped.setdefault(id(module), [])
        for sub, name, tensor in swaps:
            originals.append((sub, name, sub._parameters[name]))
            sub._parameters[name] = tensor

    def _restore(self, key: int) -> None:
        """Put back what was swapped until the module whose id is ``key`` returns."""
        for sub, name, p in self.swapped.pop(key, ()):
            sub._parameters[name] = p

    def __enter__(self) -> Hooks:
        self.handles = [nn_module.register_module_forward_pre_hook(self._pre),
                        nn_module.register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for key in list(self.swapped):  # modules whose forward was left before their hook ran
            self._restore(key)


def _normal_no_grad(build: Callable[[], dict]) -> dict:
    """``build()`` making normal tensors (not inference-mode ones) without autograd history, whatever mode the
    closure's forward runs in. It runs once per layer, so through torch's C guard, whose exit restores the grad
    mode too: ``torch.inference_mode(False)`` and ``torch.no_grad()`` cost as much as a small layer's add."""
    if torch.is_inference_mode_enabled():
        with torch._C._InferenceMode(False):
            torch._C._set_grad_enabled(False)
            return build()
    if torch.is_grad_enabled():
        with torch.no_grad():
            return build()
    return build()


def _by_output_kind(module: torch.nn.Module, name: str, p: torch.Tensor) -> bool:
    """Whether a weight may be perturbed through its module's output (table noise; see :class:`Perturbed`)."""
    return name == "weight" and (type(module) is torch.nn.Embedding or (
        type(module) is torch.nn.Linear and p.numel() >= Perturbed.BY_OUTPUT))


class _Flats(dict):
    """index -> the flat view of a tensor, made on first use."""

    def __init__(self, params: dict[int, torch.Tensor]):
        super().__init__()
        self.params = params

    def __missing__(self, index: int) -> torch.Tensor:
        flat = self[index] = self.params[index].detach().view(-1)
        return flat


class _Group(NamedTuple):
    """The trainable tensors under one entry of a ``ModuleList`` (a decoder layer), swapped in at its forward."""

    slots: tuple  # (module, name, index, tensor, by-output kind) of each
    plain: int  # how many are not of a by-output kind
    # id(module) -> None for the modules under the entry whose weights are all in ``slots``, none of a by-output
    # kind: while the group's weights are swapped their hooks have nothing to do
    quiet: dict[int, None]
    members: dict[int, tuple]  # the same modules -> their entries, put back when the entry returns


class Layout:
    """What the hooks need to know of each module, found on a module's first forward (for it and every module
    under it) instead of at every forward, and kept by the optimizer from step to step while :meth:`fits` (the
    same trainable tensors, no parameter or module registered since). A group is the trainable tensors under one
    entry of a ``ModuleList`` (a decoder layer): at that entry's forward they are perturbed with one multi-tensor
    add and swapped in, and at its return swapped back, so the modules inside find their weights perturbed already
    (their hooks return at once) and at most one layer's perturbed copy exists at a time. Modules with nothing to do
    map to None: their hooks return at once."""

    def __init__(self, opt: Perturbing):
        self.params = {index: p for index, p, _ in opt.trainable()}
        self.targets = {id(p): index for index, p in self.params.items()}
        self.table = opt.noise.tabled
        # id(module) -> None, or (own: its (name, index, tensor) that its own hook perturbs, group: the _Group it
        # is the entry of, or (), dropout: whether it is a dropout)
        self.modules: dict[int, tuple | None] = {}
        self.held: list[torch.nn.Module] = []  # keeps every module found alive, so that no id is reused
        # A parameter or module registered on a module found here (setattr, register_parameter, add_module) may
        # change which module holds a trainable tensor: the next step builds a new layout. (Registrations on other
        # modules cannot: a module is found with all those under it. Llama's forward slices its ModuleList into a
        # new one each time.) The hooks hold no reference to the layout
        self.changed = False
        ref = weakref.ref(self)

        def registered(module: torch.nn.Module, *_) -> None:
            layout = ref()
            if layout is not None and id(module) in layout.modules:
                layout.changed = True

        handles = [nn_module.register_module_parameter_registration_hook(registered),
                   nn_module.register_module_module_registration_hook(registered)]
        weakref.finalize(self, lambda: [handle.remove() for handle in handles])
        self.new_step()

    def new_step(self) -> None:
        """Forget what belongs to one step: its noise, and views of the tensors' data (replaceable between steps)."""
        self.flats = _Flats(self.params)
        self.z: dict[tuple[int, int], torch.Tensor] = {}  # (seed, index) -> z of a one-chunk tensor: a table view
        self.batches: dict[tuple, tuple] = {}  # indices perturbed together -> what Perturbed._copies needs
        self.zs: dict[tuple, list[torch.Tensor]] = {}  # (seed, indices) -> their z, shaped (table noise)

    def fits(self, opt: Perturbing) -> bool:
        """Whether this layout still describes ``opt``'s trainable tensors and the modules holding them."""
        if self.changed:
            return False
        params = self.params
        count = 0
        for index, p, _ in opt.trainable():
            if params.get(index) is not p:
                return False
            count += 1
        return count == len(params)

    def find(self, module: torch.nn.Module) -> tuple | None:
        if id(module) not in self.modules:
            self._walk(module)
        return self.modules[id(module)]

    def _slots(self, module: torch.nn.Module) -> list[tuple[str, int, torch.Tensor]]:
        if not module._parameters:
            return []
        return [(name, self.targets[id(p)], p) for name, p in module._parameters.items()
                if p is not None and id(p) in self.targets]

    def _walk(self, module: torch.nn.Module, group: list | None = None) -> None:
        """Record ``module`` and those under it; ``group``: the slots of the group it is under, filled here."""
        if id(module) in self.modules:
            return
        slots = self._slots(module)
        if group is not None:  # the module's own hook then finds its weights swapped by the group, unless it
            # runs outside the group's forward too (a module shared), or they go through its output
            group += [(module, name, index, p, self.table and _by_output_kind(module, name, p))
                      for name, index, p in slots]
        self.modules[id(module)] = None  # set before the children: a module met again is not walked again
        self.held.append(module)
        entries: dict[int, list] = {}
        for child in module._modules.values():
            if child is None:
                continue
            if group is None and isinstance(module, torch.nn.ModuleList):  # each entry is a group
                entries[id(child)] = []
                self._walk(child, entries[id(child)])
            else:
                self._walk(child, group)
        for child in module._modules.values():
            if child is not None and id(child) in entries:
                own, _, dropout = self.modules[id(child)] or ((), (), False)
                if own or entries[id(child)] or dropout:
                    self.modules[id(child)] = (own, self._group(child, entries[id(child)]), dropout)
        dropout = isinstance(module, torch.nn.modules.dropout._DropoutNd)
        if slots or dropout:
            self.modules[id(module)] = (tuple(slots), (), dropout)

    def _group(self, entry: torch.nn.Module, slots: list) -> _Group | tuple:
        if not slots:
            return ()
        members = {}
        for sub in {id(sub): sub for sub, *_ in slots}.values():
            info = self.modules[id(sub)]
            if sub is not entry and info is not None and not info[1] and not info[2] and not any(
                    by_output for s, *_, by_output in slots if s is sub):
                members[id(sub)] = info
        return _Group(tuple(slots), sum(not by_output for *_, by_output in slots), dict.fromkeys(members), members)


class Perturbed(Hooks):
    """While active, every module forward sees its trainable weights as ``w + scale * eps * z`` (MeZO).

    Usually a weight is swapped for a temporary perturbed copy while its module runs: for the weights of a
    decoder layer, all at once at the layer's entry (one multi-tensor add, the same values as one add per
    weight), dropped when the layer returns (see :class:`Layout`). With table noise, two large weights are
    perturbed through their output instead, so that no copy of them is made: an embedding's output gets
    ``eps * z`` of the rows it looked up (the same values, bitwise), and a linear layer of at least
    ``BY_OUTPUT`` values applied to at most ``SMALL_INPUT`` rows (an LM head under ``logits_to_keep``) gets
    ``eps * x @ z.T``, by blocks of rows. ``layout``: the step's, shared by its closure calls (new when None)."""

    SMALL_INPUT = 64  # rows of input under which x @ z.T (a matmul that small) is cheaper than copying the weight
    BY_OUTPUT = 1 << 16  # values under which a weight's copy costs less than the extra kernels of x @ z.T
    GATHER = 1 << 18  # values of z gathered at a time for an embedding's output: bounds the index buffers

    def __init__(self, opt: Perturbing, seed: int, scale: float, layout: Layout | None = None):
        self.layout = layout or Layout(opt)
        super().__init__(opt, self.layout.targets)
        self.seed, self.alpha = seed, scale * opt.eps
        self.seen: set[int] = set()
        self.through_output: dict[int, tuple[int, torch.Tensor]] = {}  # id(module) -> (index, weight)
        # what each module's hook has to do now (the layout's entries, None while a group has done it for them),
        # and the entries to put back when a group's entry returns
        self.active: dict[int, tuple | None] = dict(self.layout.modules)
        self.quieted: dict[int, dict[int, tuple]] = {}

    def _z(self, index: int, p: torch.Tensor) -> torch.Tensor:
        """z of a tensor of one chunk, shaped like it (what ``Noise.chunks`` yields); table views kept for the step's
        other pass and its update."""
        noise = self.opt.noise
        if not noise.tabled:
            return next(noise.chunks(self.seed, index, p.detach().view(-1)))[1].view_as(p)
        z = self.layout.z.get((self.seed, index))
        if z is None:
            z = self.layout.z[(self.seed, index)] = noise.one_chunk(self.seed, index, p)
        return z

    def _copies(self, key: tuple[int, ...]) -> dict[int, torch.nn.Parameter]:
        """Perturbed copies of the tensors ``key`` (indices): those of one chunk with one multi-tensor add.

        Each a normal (not inference-mode) Parameter like the original: torch picks matmul kernels by it. As a
        plain or inference tensor, SmolLM2's tied lm_head took a batched matmul over an 8x expanded copy of its
        weight (1.1 s instead of 9 ms in bf16). Made by ``Tensor._make_subclass``, what ``nn.Parameter`` calls,
        without the Python around it."""
        layout, params = self.layout, self.layout.params
        batch = layout.batches.get(key)
        if batch is None:  # the tensors of one chunk (and the tensors themselves), and the others
            one = [i for i in key if 0 < params[i].numel() <= self.opt.noise.chunk_size]
            batch = layout.batches[key] = (one, [params[i] for i in one], [i for i in key if i not in set(one)])
        one, weights, rest = batch
        zs = layout.zs.get((self.seed, key))
        if zs is None:
            zs = [self._z(i, params[i]) for i in one]
            if layout.table:  # views of the table: kept for the step's other pass
                layout.zs[(self.seed, key)] = zs

        def build() -> dict[int, torch.nn.Parameter]:  # (no autograd: the trainable tensors can be read as they are)
            out = dict(zip(one, torch._foreach_add(weights, zs, alpha=self.alpha))) if one else {}
            for i in rest:
                out[i] = self._perturb(i).view_as(params[i])
            return {i: torch.Tensor._make_subclass(torch.nn.Parameter, out[i], params[i].requires_grad) for i in key}

        return _normal_no_grad(build)

    def _perturb(self, index: int) -> torch.Tensor:
        """A tensor of several chunks (or none), perturbed chunk by chunk, flat."""
        flat = self.layout.flats[index]
        out = torch.empty_like(flat)
        for where, z in self.opt.noise.chunks(self.seed, index, flat):
            torch.add(flat[where], z, alpha=self.alpha, out=out[where])
        return out

    def _by_output(self, module: torch.nn.Module, name: str, args, weight: torch.Tensor) -> bool:
        if not (self.layout.table and args and _by_output_kind(module, name, weight)):
            return False
        if type(module) is torch.nn.Embedding:
            return module.max_norm is None  # max_norm renormalizes the looked-up rows of the weight itself
        return isinstance(args[0], torch.Tensor) and args[0].numel() // max(1, args[0].shape[-1]) <= self.SMALL_INPUT

    def _swap(self, module: torch.nn.Module, slots: list[tuple[torch.nn.Module, str, int]]) -> None:
        """Swap perturbed copies in for ``slots`` (module, name, index) until ``module`` returns."""
        key = tuple(dict.fromkeys(index for _, _, index in slots))
        copies = self._copies(key)
        self._put(module, [(sub, name, copies[index]) for sub, name, index in slots])
        self.seen.update(key)

    def _pre(self, module: torch.nn.Module, args) -> None:
        info = self.active.get(id(module), Layout)  # Layout: a module not met before
        if info is None:
            return
        if info is Layout:
            info = self.active[id(module)] = self.layout.find(module)
            if info is None:
                return
        own, group, dropout = info
        slots = []
        if group:  # a layer's entry: all its weights at once, but those its modules may perturb through their output
            small = bool(args) and isinstance(args[0], torch.Tensor) and args[0].ndim > 0 and (
                args[0].numel() // max(1, args[0].shape[-1]) <= self.SMALL_INPUT)
            slots = [(sub, name, index) for sub, name, index, p, by_output in group.slots
                     if not (by_output and small) and sub._parameters.get(name) is p]
        everything = bool(slots) and len(slots) == (group.plain if small else len(group.slots))
        for name, index, p in own:
            if module._parameters.get(name) is not p:
                continue  # swapped by its layer
            if self._by_output(module, name, args, p):
                self.seen.add(index)
                self.through_output[id(module)] = (index, p)
            else:
                slots.append((module, name, index))
        if slots:
            self._swap(module, slots)
            if everything:  # the modules inside find their weights swapped: their hooks need not look
                self.active.update(group.quiet)
                self.quieted[id(module)] = group.members
        if dropout and module.training and module.p > 0:
            if not self.opt.warned_training:
                self.opt.warned_training = True
                warnings.warn("MeZO: dropout is active (the model is in training mode): it makes the two losses of "
                              "an estimate differ. Call model.eval() first", stacklevel=2)

    def _post(self, module: torch.nn.Module, args, output):
        key = id(module)
        if key in self.swapped:
            self._restore(key)
            members = self.quieted.pop(key, None)
            if members:
                self.active.update(members)
        if key not in self.through_output:
            return None
        index, p = self.through_output.pop(key)
        flat, noise, width = self.layout.flats[index], self.opt.noise, p.shape[1]
        offsets = noise.offsets(self.seed, index, flat.numel())
        if isinstance(module, torch.nn.Embedding):  # output[i] = w[ids[i]]: add z of that row
            ids, out, rows = args[0].reshape(-1), output.view(-1, width), max(1, self.GATHER // width)
            if len(offsets) == 1:  # z of one chunk, shaped like the weight: its rows looked up as the weight's are
                z = self._z(index, p)
                for start in range(0, ids.numel(), rows):
                    out[start:start + rows].add_(torch.nn.functional.embedding(ids[start:start + rows], z),
                                                 alpha=self.alpha)
                return output
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


def member_slots(module: torch.nn.Module, args: tuple, targets: dict[int, int],
                 who: str) -> tuple[list[tuple], list[tuple]]:
    """How batched members perturb ``module``'s trainable tensors: (swaps: 1-D weights that broadcast over rows,
    swapped for one row of weights per input row; outputs: Linear and Embedding tensors, perturbed through the
    output), each a list of (name, index, tensor). Any other trainable tensor is refused, naming ``who``."""
    swaps, outputs = [], []
    for name, p in module._parameters.items():
        index = targets.get(id(p)) if p is not None else None
        if index is None:
            continue
        if type(module) in (torch.nn.Linear, torch.nn.Embedding) and name in ("weight", "bias"):
            if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
                raise ValueError(f"{who} do not support an Embedding with max_norm")
            outputs.append((name, index, p))
        elif (p.ndim == 1 and args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 1
              and not isinstance(module, SHAPE_CHECKED)):
            swaps.append((name, index, p))
        else:
            raise ValueError(f"{who} cover Linear and Embedding weights and 1-D weights that broadcast over rows "
                             f"(norms); {type(module).__name__}.{name} {tuple(p.shape)} is neither: freeze it "
                             "(requires_grad=False) or use MeZO")
    return swaps, outputs


class Members(Hooks):
    """While active, row block i of every module's input sees the perturbation of member i of the pairs ``seeds``
    (a population's; see the module docstring)."""

    def __init__(self, opt: LowRank, seeds: Sequence[int]):
        super().__init__(opt, {id(p): index for index, p, _ in opt.trainable()})
        self.seeds, self.alpha = list(seeds), opt.eps
        self.outputs: dict[int, list[tuple[str, int, torch.Tensor]]] = {}  # id(module) -> perturbed via its output
        self.positions: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Factors kept for the next forward (each decoding step of generate runs every module again), up to
        # CACHE_SHARE of the trainable values: beyond that they are regenerated, so memory stays near inference's
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.room = CACHE_SHARE * sum(p.numel() for _, p, _ in opt.trainable())

    def _stack(self, index: int, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every local pair's factors in ``p``'s dtype: A (pairs, out, r) and B (pairs, in, r), or z (pairs, n)."""
        if index in self.cache:
            return self.cache[index]
        (rows, cols), r, noise = self.opt.factor_shape(p), self.opt.perturbation_rank, self.opt.noise
        n = (rows + cols) * r if cols else rows
        if noise.tabled:  # one gather for all pairs: the values _factors reads, chunk by chunk
            if (n, p.device) not in self.positions:  # (chunk, place in it) of each value; tensors share shapes
                at = torch.arange(n, device=p.device)
                self.positions[(n, p.device)] = at // noise.chunk_size, at % noise.chunk_size
            chunk, within = self.positions[(n, p.device)]
            offsets = torch.tensor([noise.offsets(seed, index, n) for seed in self.seeds], device=p.device)
            values = noise.table(p.device, p.dtype)[offsets[:, chunk] + within]
        else:
            values = torch.empty(len(self.seeds), n, device=p.device)
            for k, seed in enumerate(self.seeds):
                self.opt.factors(seed, index, p, out=values[k])
            values = values.to(p.dtype)
        factors = (values, None) if not cols else (values[:, : rows * r].view(-1, rows, r),
                                                   values[:, rows * r:].view(-1, cols, r))
        if values.numel() <= self.room:
            self.room -= values.numel()
            self.cache[index] = factors
        return factors

    def _blocks(self, rows: int, module: torch.nn.Module) -> int:
        """Rows per member in a forward of ``rows`` rows."""
        members = 2 * len(self.seeds)
        if rows % members:
            raise ValueError(f"a forward of {rows} rows through {type(module).__name__} cannot hold {members} members: "
                             "repeat the batch once per member, rows grouped by member (PopulationObjective does)")
        return rows // members

    def _pre(self, module: torch.nn.Module, args) -> None:
        swaps, outputs = member_slots(module, args, self.targets, "population perturbations")
        if outputs:
            self.outputs[id(module)] = outputs
        if swaps:
            x = args[0]
            per = self._blocks(x.shape[0], module)
            sign = torch.tensor([1.0, -1.0], device=x.device)
            for name, index, p in swaps:
                z, _ = self._stack(index, p)  # (pairs, d)
                w = (p.detach().float() + self.alpha * z.float()[:, None] * sign[None, :, None]).to(p.dtype)
                shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (p.shape[0],)
                self._put(module, [(module, name, w.view(-1, p.shape[0]).repeat_interleave(per, 0).view(shape))])

    def _post(self, module: torch.nn.Module, args, output):
        self._restore(id(module))
        outputs = self.outputs.pop(id(module), None)
        if not outputs or output is None:  # None: the module's forward raised
            return None
        pairs, x = len(self.seeds), args[0]
        self._blocks(x.shape[0], module)
        out = output.view(pairs, 2, -1, output.shape[-1])  # (pair, sign, rows of a member, features)
        sign = torch.tensor([1.0, -1.0], device=out.device, dtype=out.dtype).view(1, 2, 1, 1)
        scale = self.alpha / math.sqrt(self.opt.perturbation_rank)
        for name, index, p in outputs:
            a, b = self._stack(index, p)
            if name == "bias":
                out.add_(a[:, None, None, :] * sign, alpha=self.alpha)
            elif isinstance(module, torch.nn.Embedding):  # rows A_k[ids] @ B_k^T
                ids = x.reshape(pairs, -1)
                picked = torch.gather(a, 1, ids[..., None].expand(-1, -1, a.shape[-1]))  # (pairs, 2*rows, r)
                low = (picked.view(pairs, 2, -1, a.shape[-1]) * sign).view(pairs, -1, a.shape[-1])
                out.view(pairs, -1, out.shape[-1]).baddbmm_(low, b.transpose(1, 2), alpha=scale)
            else:  # x @ B_k, signed, @ A_k^T, added by the matmul itself (no output-sized temporary)
                low = torch.bmm(x.reshape(pairs, -1, x.shape[-1]), b)  # (pairs, 2*rows, r)
                low = (low.view(pairs, 2, -1, low.shape[-1]) * sign).view(pairs, -1, low.shape[-1])
                out.view(pairs, -1, out.shape[-1]).baddbmm_(low, a.transpose(1, 2), alpha=scale)
        return output
