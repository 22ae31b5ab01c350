"""The noise and the rounding of both estimators, regenerated from seeds and never stored.

A step's noise z is regenerated from (seed, tensor index, chunk) whenever it is needed (to perturb a forward, to
update), in chunks of bounded size, so no weight-sized buffer of it ever exists. An update of bf16/fp16 weights is
computed in fp32 per chunk and stochastically rounded, with random bits regenerated from the step's seed: the
expected change equals the fp32 update (round-to-nearest would drop most updates smaller than half an ulp), and
resume and ``replay`` stay bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MASK64 = (1 << 64) - 1
NOISE_KINDS = ("table", "gaussian", "rademacher", "signs")
TABLED = ("table", "signs")  # read from the table at hashed offsets (a memory read, no random draw)
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
    ``signs``: the table's signs, Rademacher values read the same way. ``gaussian``: exact N(0, 1) per chunk from a
    private ``torch.Generator``. ``rademacher``: +-1 likewise.
    """

    def __init__(self, kind: str = "table", table_size: int = 1 << 22, table_seed: int = 0,
                 chunk_size: int = 1 << 18):
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; accepted: {', '.join(NOISE_KINDS)}")
        if table_size < 2 * chunk_size:
            raise ValueError(f"noise table_size must be at least 2 * chunk_size = {2 * chunk_size}")
        self.kind, self.table_size, self.table_seed, self.chunk_size = kind, table_size, table_seed, chunk_size
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def tabled(self) -> bool:
        """Whether z is read from the table (``table``, ``signs``): slices are views, shared by a step's passes."""
        return self.kind in TABLED

    def gaussian(self, device: torch.device) -> torch.Tensor:
        """The standardized fp32 Gaussian table on ``device``, made once (also the source of the rounding bits)."""
        key = (device, torch.float32)
        if key not in self._tables:
            gen = torch.Generator().manual_seed(self.table_seed)
            table = torch.randn(self.table_size, generator=gen)
            mean, std = table.double().mean().item(), table.double().std().item()
            table.sub_(mean).div_(std)  # exactly standardized, built in place: no temporary copies
            self._tables[key] = table.to(device)
        return self._tables[key]

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table z is read from, in ``dtype`` on ``device``, made once: the Gaussian one, or for ``signs`` its
        signs (Rademacher values, +-1 with probability 1/2 each, exact in every dtype)."""
        key = (device, dtype, self.kind)
        if key not in self._tables:
            table = self.gaussian(device)
            if self.kind == "signs":
                table = torch.ones_like(table).copysign_(table)  # (a standardized value is never 0)
            self._tables[key] = table.to(dtype)
        return self._tables[key]

    def _offset(self, length: int, *key: int) -> int:
        """Where a slice of ``length`` values for ``key`` starts in the table; memoized (a step's perturbations and
        update read the same offsets, and ``mix`` is Python arithmetic), the memo bounded."""
        memo = self.__dict__.setdefault("_offsets", {})
        offset = memo.get((length, key))
        if offset is None:
            if len(memo) >= 1 << 16:
                memo.clear()
            offset = memo[(length, key)] = mix(*key) % (self.table_size - length + 1)
        return offset

    def _wide_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table rounded to ``dtype``, held in fp32, for a half-precision update on the CPU: adding it to the
        fp32 buffer is a same-dtype kernel, twice as fast there as adding the half-precision table."""
        key = (device, dtype, torch.float32)
        if key not in self._tables:
            self._tables[key] = self.table(device, dtype).float()
        return self._tables[key]

    def chunks(self, seed: int, index: int, flat: torch.Tensor,
               wide: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice of ``flat``, z for that slice); the same arguments always yield the same z, in
        ``flat``'s precision (``wide``, table noise only: the same values in fp32)."""
        n, c = flat.numel(), self.chunk_size
        if self.tabled:
            table = self._wide_table(flat.device, flat.dtype) if wide else self.table(flat.device, flat.dtype)
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

    def one_chunk(self, seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
        """z of a contiguous tensor of at most one chunk, shaped like it (table noise): the slice ``chunks`` yields
        for it, made as one view."""
        table = self.table(like.device, like.dtype)
        return table.as_strided(like.shape, like.stride(), self._offset(like.numel(), seed, index, 0))

    def offsets(self, seed: int, index: int, n: int) -> list[int]:
        """Where each chunk of a tensor of ``n`` values reads the table (table noise): for :meth:`gather` and
        :meth:`span`, computed once per tensor."""
        c = self.chunk_size
        return [self._offset(min(c, n - start), seed, index, k) for k, start in enumerate(range(0, n, c))]

    def gather(self, flat: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """z at the given positions of ``flat`` (``offsets`` as a tensor): the values ``chunks`` yields there."""
        c = self.chunk_size
        return self.table(flat.device, flat.dtype)[offsets[positions // c] + positions % c]

    def span(self, flat: torch.Tensor, offsets: list[int], start: int, stop: int) -> torch.Tensor:
        """z of ``flat[start:stop]``: the table slices ``chunks`` yields there, joined."""
        c, table = self.chunk_size, self.table(flat.device, flat.dtype)
        pieces = [table[offsets[k] + max(start, k * c) - k * c: offsets[k] + min(stop, (k + 1) * c) - k * c]
                  for k in range(start // c, (stop - 1) // c + 1)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def rounding_bits(self, seed: int, index: int, chunk: int, length: int, device: torch.device) -> torch.Tensor:
        """16 random bits per element (int32 in [0, 65536)) for stochastic rounding, regenerated from the
        seed: the low mantissa bits of the fp32 table at a hashed offset (a read, not a random draw)."""
        key = (device, torch.int32)
        if key not in self._tables:
            self._tables[key] = self.gaussian(device).view(torch.int32) & 0xFFFF
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
def chunk_update(weight: torch.Tensor, decay: float, bits: torch.Tensor | None = None,
                 buffer: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """``weight <- weight * decay + move`` in place, the move added to the yielded accumulator by the block: the
    arithmetic of every update, both estimators'. A bf16/fp16 ``weight`` is widened to fp32 (into ``buffer`` when
    given) and rounded back stochastically with ``bits`` (16 per element) when the block ends; other weights are
    their own accumulator. A decay of exactly 1 is skipped: it changes nothing."""
    half = weight.dtype in HALF
    acc = weight
    if half:
        acc = weight.float() if buffer is None else buffer[:weight.numel()].view_as(weight).copy_(weight)
    if decay != 1.0:
        acc.mul_(decay)
    yield acc
    if half:
        round_stochastic(acc.view(-1), bits, out=weight.view(-1))


def eager_update(weight: torch.Tensor, z: torch.Tensor, bits: torch.Tensor, decay: float, alpha: float) -> None:
    """One chunk of a half-precision update with one term (what the fused kernel is checked against): widen,
    decay, add alpha * z, round."""
    with chunk_update(weight, decay, bits) as acc:
        acc.add_(z, alpha=alpha)
