"""Time one forward pass, a MeZO step (each noise kind, forward differences) and the reference MeZO step.

All in one process on one fixed batch (16 x 64 random token ids, full attention mask), repetitions
interleaved (the order of the configurations rotates each round) so that a noisy machine slows them alike.
The ratio ``step / (2 x forward)`` is the cost of a step over its two closure calls (goal: <= 1.05 for the
default table noise; the reference is about 2.2). A step is two forwards with perturbed weights and the update:
"weights only" rows time a step whose closure returns a constant (the passes over the weights alone), and the
"perturbed weights" row one forward as a step runs it.

    python benchmarks/step_speed.py                      # SmolLM2-135M, 5 repeats
    python benchmarks/step_speed.py --model tiny-random --repeats 1
    python benchmarks/step_speed.py --write              # update the step_speed section of BENCHMARKS.md
    python benchmarks/step_speed.py --proxy --write      # the launch-bound proxy: step_speed_proxy.json

``--proxy`` stands in on the CPU for a GPU's launch-bound regime, where a forward pass takes milliseconds and
what a step adds over it is fixed costs per tensor (Python, kernel launches): on a Llama whose compute is
negligible (hidden size 64, 8 layers, 1 x 8 tokens, one thread) it reports the time a step adds over its two
forward passes per trainable tensor, for our step and the reference's in the same run (goal: ours at most a
quarter of the reference's).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DTYPES, forward, label_word_loss, publish, setup  # noqa: E402
from reference_mezo import reference_step  # noqa: E402

from zo_objectives.estimators import MeZO  # noqa: E402
from zo_objectives.estimators.hooks import Perturbed  # noqa: E402
from zo_objectives.noise import NOISE_KINDS  # noqa: E402

LR, EPS = 1e-6, 1e-3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def configurations(model: torch.nn.Module, batch: dict, overhead: bool = True,
                   sizes: dict | None = None) -> dict[str, tuple[str, Callable]]:
    """name -> (kind, zero-argument callable); kind is "forward", "perturbed forward" (one closure call of a
    step), "step" or "weights" (a closure with no forward pass: for our MeZO the update pass alone).
    ``sizes``: the noise's ``chunk_size`` and ``table_size``."""
    sizes = sizes or {}
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> float:
        return label_word_loss(model, batch)

    losses = itertools.cycle([1.0, 0.0])

    def constant() -> float:  # no forward pass; the losses differ, so the update moves every weight
        return next(losses)

    configs: dict[str, tuple[str, Callable]] = {
        "forward (logits_to_keep=1)": ("forward", lambda: forward(model, batch, keep=1)),
        "forward (full logits)": ("reference forward", lambda: forward(model, batch, keep=0)),
    }
    optimizers = {f"MeZO {kind}" + (" (default)" if kind == "table" else ""):
                  MeZO(params, lr=LR, eps=EPS, noise=kind, **sizes) for kind in NOISE_KINDS}
    optimizers["MeZO table, forward difference"] = MeZO(params, lr=LR, eps=EPS, difference="forward", **sizes)
    for name, opt in optimizers.items():
        configs[name] = ("step", lambda opt=opt: opt.step(closure))
    seeds = iter(range(1 << 30))
    configs["reference MeZO"] = ("step", lambda: reference_step(model, closure, LR, EPS, next(seeds)))
    default = optimizers["MeZO table (default)"]

    def perturbed_forward() -> torch.Tensor:  # one closure call of a step: weights perturbed inside the forward
        with torch.no_grad(), Perturbed(default, seed=next(seeds), scale=1.0, layout=default.layout()):
            return forward(model, batch, keep=1)

    configs["forward with perturbed weights (table)"] = ("perturbed forward", perturbed_forward)
    if overhead:
        for name, opt in optimizers.items():
            configs[f"{name}: update pass only"] = ("weights", lambda opt=opt: opt.step(constant))
        configs["reference MeZO: weights only"] = (
            "weights", lambda: reference_step(model, constant, LR, EPS, next(seeds)))
    return configs


def measure(configs: dict[str, tuple[str, Callable]], repeats: int, device: str, warmup: int = 1,
            log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each configuration, ``repeats`` times each, rounds interleaved and rotated."""
    names = list(configs)
    for _ in range(warmup):
        for name in names:
            configs[name][1]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            configs[name][1]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if log:
            log(f"round {r + 1}/{repeats} done")
    return times


def rows(configs: dict[str, tuple[str, Callable]], times: dict[str, list[float]]) -> list[list]:
    """Table rows: name, median seconds, min seconds, and step / (2 x forward) for steps and weight passes."""
    fwd = statistics.median(times["forward (logits_to_keep=1)"])
    out = []
    for name, (kind, _) in configs.items():
        med = statistics.median(times[name])
        if kind == "step":
            ratio = f"{med / (2 * fwd):.3f}"
        elif kind == "weights":  # the step's predicted ratio if its overhead adds to two forward passes
            ratio = f"+{med / (2 * fwd):.3f}"
        elif kind == "forward":
            ratio = "1 forward"
        elif kind == "perturbed forward":
            ratio = f"{med / fwd:.3f} forwards"
        else:
            ratio = f"{med / fwd:.2f} forwards"
        out.append([name, f"{med:.4f}", f"{min(times[name]):.4f}", ratio])
    return out


HEADER = ["configuration", "median s", "min s", "step / (2 x forward)"]
PROXY_HEADER = ["configuration", "median ms", "added over 2 closure calls, us per tensor", "ours / reference"]


def proxy(repeats: int, warmup: int, dtype: str, write: bool) -> list[list]:
    """The launch-bound proxy: per trainable tensor, the time a step adds over its two forward passes."""
    model, batch = setup("random-proxy", "cpu", 1, 1, 8, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MeZO(params, lr=LR, eps=EPS)
    seeds = iter(range(1 << 30))

    def closure() -> float:
        return label_word_loss(model, batch)

    losses = itertools.cycle([1.0, 0.0])
    update_only = MeZO(params, lr=LR, eps=EPS)

    def perturbed_closure() -> float:  # one closure call of a step (a new seed): weights perturbed inside the forward
        with torch.no_grad(), Perturbed(opt, seed=next(seeds), scale=1.0, layout=opt.layout()):
            return closure()

    configs = {"closure (forward pass and loss)": ("forward", closure),
               "MeZO step (table noise)": ("step", lambda: opt.step(closure)),
               "reference MeZO step": ("step", lambda: reference_step(model, closure, LR, EPS, next(seeds))),
               # where our step's time goes: one perturbed closure call (x 2 per step), and the update alone
               "closure with perturbed weights (x 2 per step)": ("perturbed", perturbed_closure),
               "update pass only (closure without a forward)": ("weights",
                                                                lambda: update_only.step(lambda: next(losses)))}
    times = measure(configs, repeats, "cpu", warmup, log=None)
    fwd = statistics.median(times["closure (forward pass and loss)"])
    # what each adds over the closure calls it stands for, per trainable tensor
    calls = {"step": 2, "perturbed": 1, "weights": 0, "forward": 1}
    added = {name: (statistics.median(times[name]) - calls[kind] * fwd) * (2 if kind == "perturbed" else 1)
             / len(params) for name, (kind, _) in configs.items()}
    reference = added["reference MeZO step"]
    table = [["closure (forward pass and loss)", f"{fwd * 1e3:.3f}", "-", "-"]]
    table += [[name, f"{statistics.median(times[name]) * 1e3:.3f}", f"{added[name] * 1e6:.1f}",
               f"{added[name] / reference:.3f}"] for name, (kind, _) in configs.items() if kind != "forward"]
    title = (f"Launch-bound proxy: a random Llama of hidden size 64, 8 layers ({len(params)} trainable tensors, "
             f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters), batch 1 x 8 tokens, {dtype}, one CPU "
             f"thread; median of {repeats} interleaved repeats after {warmup} warm-up round(s).")
    notes = ("\"added\" = (step - 2 x closure) / trainable tensors, the closure being the step's forward pass and "
             "loss: the fixed cost per tensor that dominates a step on a GPU, where a forward pass takes "
             "milliseconds. Goal: ours at most a quarter of the reference's (four passes over the weights, each "
             "drawing z per tensor). The last two rows split our step: its two perturbed closure calls (what "
             "they add over two plain ones) and its update pass; the rest of the step (its seeds, records, "
             "layout) is the difference.")
    section = "step_speed_proxy" + ("" if dtype == "fp32" else f"_{dtype}")
    publish(section, f"Step speed, launch-bound proxy{'' if dtype == 'fp32' else ', ' + dtype}", title,
            PROXY_HEADER, table, "cpu", write, notes=notes,
            params={"model": "random-proxy", "batch_size": 1, "seq_len": 8, "dtype": dtype, "tensors": len(params),
                    "repeats": repeats, "us_per_tensor": {k: added[k] * 1e6 for k in added if k in configs and
                                                          configs[k][0] != "forward"}})
    return table


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny-random, or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before measuring")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--chunk-size", type=int, default=1 << 18, help="MeZO's noise chunk (GPU: 16777216)")
    parser.add_argument("--table-size", type=int, default=1 << 22, help="MeZO's noise table (>= 2 chunks)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the weights-only rows")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 repeat, no warm-up, no weights-only "
                        "rows (numbers not for reporting)")
    parser.add_argument("--write", action="store_true", help="update the step_speed section of BENCHMARKS.md")
    parser.add_argument("--proxy", action="store_true", help="the launch-bound proxy (a tiny Llama at 1 x 8 tokens, "
                        "one thread; --repeats 300 by default): time added per trainable tensor, ours and the "
                        "reference's")
    args = parser.parse_args(argv)
    if args.proxy:
        repeats = args.repeats if "--repeats" in (argv if argv is not None else sys.argv) else 300
        return proxy(repeats, max(args.warmup, 5), args.dtype, args.write)
    if args.quick:
        args.repeats, args.warmup, args.no_overhead = 1, 0, True
    model, batch = setup(args.model, args.device, args.threads, args.batch_size, args.seq_len, dtype=args.dtype)
    sizes = {"chunk_size": args.chunk_size, "table_size": args.table_size}
    configs = configurations(model, batch, overhead=not args.no_overhead, sizes=sizes)
    times = measure(configs, args.repeats, args.device, args.warmup,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    table = rows(configs, times)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    title = (f"Step speed: {args.model} ({n_params / 1e6:.1f}M trainable parameters), batch {args.batch_size} x "
             f"{args.seq_len} tokens, {args.dtype}, device {args.device}, median of {args.repeats} interleaved "
             f"repeats after {args.warmup} warm-up round(s). lr={LR}, eps={EPS}, noise chunks of {args.chunk_size} "
             f"values.")
    notes = ("Ratios are to two forward passes with `logits_to_keep=1` (a central-difference step's two "
             "closure calls); goal <= 1.05 for the default. \"+x\" on a weights-only row is that pass's time "
             "over two forward passes.")
    section = "_".join(["step_speed"] + [v for v, default in ((args.model, "smollm2-135m"), (args.dtype, "fp32"),
                                                              (args.device, "cpu")) if v != default])
    heading = f"Step speed ({args.model}{'' if args.dtype == 'fp32' else ', ' + args.dtype})"
    publish(section, heading, title, HEADER, table, args.device, args.write, notes=notes,
            params={"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
                    "chunk_size": args.chunk_size})
    return table


if __name__ == "__main__":
    main()
