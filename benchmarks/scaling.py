"""Peak memory against model size and batch for inference, MeZO, backprop + AdamW and backprop + LoRA, fitted per
method and projected to one 80 GiB GPU: the MeZO paper's claim (OPT-30B tuned on one 80 GB A100 in half precision,
where backpropagation fits 2.7B) as a table.

For each model shape and method, one subprocess (this script with ``--worker``) builds the Llama with random
weights once, then runs each batch shape in turn, smallest first: freed memory handed back to the kernel, the
high-water mark reset, ``--steps`` iteration(s) with a fresh optimizer, the peak recorded (RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). Backprop + AdamW on the last (largest) model runs the smallest batch
only. Per method, a least-squares fit over its points

    peak = a * params + b * tokens * layers * hidden + c

separates the bytes per parameter (a: weights, gradients, optimizer states, MeZO's perturbed copy of one tensor),
the activation bytes per token per layer-hidden unit (b) and a constant (c: on CPU the Python process and its
libraries). The projection evaluates each fit at batch 16 x 256 for OPT's published shapes.

    python benchmarks/scaling.py --write     # 135M, 360M, 1.1B in bf16 at 2 x 32 and 8 x 32, 1 thread (~10 min)
    python benchmarks/scaling.py --device cuda --sizes random-1.1b,random-7b,random-13b --shapes 4x256,16x256
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory  # noqa: E402
from _common import DTYPES, RANDOM_LLAMAS, build_model, markdown_table, publish  # noqa: E402

METHODS = {"inference": "inference", "mezo": "MeZO", "lora": "backprop + LoRA (AdamW)",
           "adamw": "backprop + AdamW"}
# OPT's published shapes (Zhang et al., 2022): layers, hidden; vocabulary 50272, tied embeddings
OPT_SHAPES = {"OPT-1.3B": (24, 2048), "OPT-2.7B": (32, 2560), "OPT-6.7B": (32, 4096), "OPT-13B": (40, 5120),
              "OPT-30B": (48, 7168), "OPT-66B": (64, 9216)}
OPT_VOCAB = 50272
TARGET = (16, 256)  # batch x tokens of the projection
GPU_BYTES = 80 * 1024**3
GIB, MIB = 1024**3, 1024**2
# AdamW's two states: torch keeps them in the parameter's dtype (measured: bf16); in fp32 they take 4 more bytes per
# parameter, and mixed precision (an fp32 master copy of the weights beside fp32 states) 8 more
ADAMW_VARIANTS = {"adamw": ("backprop + AdamW, bf16 states (measured)", 0),
                  "adamw-fp32-states": ("backprop + AdamW, fp32 states (measured + 4 B/param)", 4),
                  "adamw-mixed": ("backprop + AdamW, fp32 master weights and states (measured + 8 B/param)", 8)}


def opt_params(layers: int, hidden: int) -> int:
    """Parameters of a Llama with OPT's layers and hidden size: intermediate 8/3 hidden (so each layer holds 12
    hidden^2 weights, as OPT's), two norms per layer, OPT's tied 50272-token embedding."""
    return OPT_VOCAB * hidden + layers * (12 * hidden * hidden + 2 * hidden) + hidden


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"2x32,8x32" -> [(2, 32), (8, 32)], sorted by token count; ValueError on anything else."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad batch shape {item!r}: expected BATCHxTOKENS such as 2x32")
        shapes.append((int(parts[0]), int(parts[1])))
    return sorted(shapes, key=lambda s: s[0] * s[1])


def make_batch(vocab: int, batch_size: int, seq_len: int, device: str) -> dict:
    """Random token ids with a full mask, as ``_common.setup`` builds them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).to(device),
            "labels": torch.randint(0, 2, (batch_size,), generator=gen).to(device),
            "label_ids": torch.tensor([vocab // 3, 2 * vocab // 3], device=device)}


def worker(model_name: str, method: str, shapes: list[tuple[int, int]], device: str, dtype: str,
           threads: int | None, steps: int) -> list[dict]:
    """Build the model once (on ``device`` directly), run ``method`` at each batch shape; one dict per shape."""
    if threads:
        torch.set_num_threads(threads)
    with torch.device(device):  # built where it runs: a 30B model is never staged in host memory
        model = build_model(model_name, dtype)
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    model = memory.prepare(method, model)
    memory.page_in(model)
    cuda = device.startswith("cuda")
    out = []
    for batch_size, seq_len in shapes:
        batch = make_batch(config.vocab_size, batch_size, seq_len, device)
        memory.release_freed()
        point = {"model": model_name, "method": method, "params": params, "layers": config.num_hidden_layers,
                 "hidden": config.hidden_size, "batch_size": batch_size, "seq_len": seq_len}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            point["loaded"] = torch.cuda.memory_allocated()
        else:
            point["loaded"] = memory.current_rss_kib() * 1024
            memory.reset_peak()
        try:
            memory.run_steps(method, model, batch, steps)
        except torch.OutOfMemoryError:  # CUDA only; the CPU has no such error (the kernel kills the process)
            model.zero_grad(set_to_none=True)
            out.append({**point, "peak": None})
            break
        point["peak"] = (torch.cuda.max_memory_allocated() if cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        out.append(point)
        del batch
    return out


def measure(sizes: list[str], methods: list[str], shapes: list[tuple[int, int]], device: str, dtype: str,
            threads: int | None, steps: int) -> list[dict]:
    """Every (size, method) in its own subprocess; backprop + AdamW on the last size at the smallest shape only."""
    points = []
    for size in sizes:
        for method in methods:
            todo = shapes[:1] if (method == "adamw" and size == sizes[-1]) else shapes
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", size, method, "--device", device,
                   "--dtype", dtype, "--steps", str(steps), "--shapes", ",".join(f"{b}x{s}" for b, s in todo)]
            if threads:
                cmd += ["--threads", str(threads)]
            found = memory.run_worker(cmd, f"{method} on {size}")
            points += found
            print(f"{size} {method}: " + ", ".join(
                f"{p['batch_size']}x{p['seq_len']} " + (f"{p['peak'] / MIB:.0f} MiB" if p["peak"] else "OOM")
                for p in found), file=sys.stderr, flush=True)
    return points


def features(params: float, tokens: float, layers: float, hidden: float) -> np.ndarray:
    return np.array([params, tokens * layers * hidden, 1.0])


def point_features(p: dict) -> np.ndarray:
    return features(p["params"], p["batch_size"] * p["seq_len"], p["layers"], p["hidden"])


def fit(points: list[dict]) -> dict:
    """Least squares of peak = a*params + b*tokens*layers*hidden + c over the points that ran (not out of memory)."""
    ran = [p for p in points if p["peak"]]
    if len({p["params"] for p in ran}) < 2 or len({p["batch_size"] * p["seq_len"] for p in ran}) < 2:
        raise ValueError("the fit needs points at two model sizes or more and two token counts or more")
    x = np.array([point_features(p) for p in ran])
    y = np.array([float(p["peak"]) for p in ran])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    error = float(np.max(np.abs(x @ coef - y) / y))
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "points": len(ran), "max_error": error}


def predict(coef: dict, x: np.ndarray, extra_per_param: float = 0.0) -> float:
    """Bytes the fit gives for features ``x`` (plus ``extra_per_param`` bytes per parameter)."""
    return float(np.dot([coef["a"] + extra_per_param, coef["b"], coef["c"]], x))


def tables(points: list[dict]) -> tuple[list[str], list[list], str, str, dict]:
    """The fit table (main), the projection and the measured points (markdown tables), and the fits."""
    methods = [m for m in METHODS if any(p["method"] == m for p in points)]
    fits = {m: fit([p for p in points if p["method"] == m]) for m in methods}
    variants = [(m, METHODS[m], 0) for m in methods if m != "adamw"]
    if "adamw" in fits:
        variants += [("adamw", label, extra) for label, extra in ADAMW_VARIANTS.values()]
    target = TARGET[0] * TARGET[1]
    rows, projection = [], {}
    for method, label, extra in variants:
        coef = fits[method]
        gib = {name: predict(coef, features(opt_params(*shape), target, *shape), extra) / GIB
               for name, shape in OPT_SHAPES.items()}
        projection[label] = gib
        fitting = [name for name, value in gib.items() if value * GIB <= GPU_BYTES]
        rows.append([label, f"{coef['a'] + extra:.2f}", f"{coef['b']:.1f}", f"{coef['c'] / MIB:.0f}",
                     str(coef["points"]), f"{100 * coef['max_error']:.1f}%", fitting[-1] if fitting else "none"])
    header = ["method", "bytes / parameter (a)", "activation bytes / (token x layer x hidden) (b)", "constant MiB (c)",
              "points", "max fit error", f"largest OPT shape in {GPU_BYTES // GIB} GiB at {TARGET[0]} x {TARGET[1]}"]
    proj_rows = [[f"{name} ({opt_params(*shape) / 1e9:.1f}B)"] + [f"{gib[name]:.1f}" for gib in projection.values()]
                 for name, shape in OPT_SHAPES.items()]
    proj = markdown_table(["shape (parameters)"] + [f"{label}, GiB" for label in projection], proj_rows)
    point_rows = [[p["model"], METHODS[p["method"]], f"{p['params'] / 1e6:.0f}M", f"{p['batch_size']} x {p['seq_len']}",
                   f"{p['loaded'] / MIB:.0f}", f"{p['peak'] / MIB:.0f}" if p["peak"] else "out of memory",
                   f"{predict(fits[p['method']], point_features(p)) / MIB:.0f}"] for p in points]
    measured = markdown_table(["model", "method", "parameters", "batch", "loaded MiB", "peak MiB", "fit MiB"],
                              point_rows)
    return header, rows, proj, measured, fits


OFFLOADING = (
    "Offloading (as ZO2 does: OPT-175B on one 18 GB GPU) would fit this design: MeZO here already touches one "
    "module's weights at a time (each forward builds that module's perturbed weight w + eps*z on the fly and drops "
    "it when the module returns; the update walks the tensors one by one). With the weights kept in pinned CPU "
    "memory, a forward pre-hook per decoder layer would copy its weights to the GPU (on a side stream, overlapping "
    "the previous layer's compute), the perturbation hook would run as now, and a post-hook would drop the GPU "
    "copy; the update would stream layer by layer the same way (copy in, add -lr*g*z regenerated from the seed, "
    "round, copy out). To cross the bus once per layer per step rather than three times, the +eps and -eps "
    "passes would run layer by layer on the same batch (two activation streams), and each layer's update would be "
    "applied when it is next loaded, as ZO2 does. GPU memory would then be about two layers' weights plus "
    "activations, and the step time the larger of the compute and weights / bus bandwidth. Nothing of this is "
    "built here.")


def assumptions(dtype: str, device: str) -> str:
    what = ("peak RSS, so the constant c holds the Python process and its libraries (several hundred MiB that a "
            "GPU would not count)" if device == "cpu" else "torch.cuda.max_memory_allocated")
    return (f"Assumptions of the projection: weights in {dtype}; measured peaks are {what}; the activation term is "
            f"the fit's b x tokens x layers x hidden at {TARGET[0]} x {TARGET[1]} tokens, so it carries over the "
            "attention as measured (PyTorch's scaled_dot_product_attention at short sequences, where a seq^2 term "
            "is small) and the full-vocabulary logits of the backprop loss, folded into b; inference and MeZO "
            "free each layer's activations, so for them the layer factor overstates (b is small). OPT shapes are "
            "taken Llama-shaped (see opt_params). AdamW as measured keeps its states in the weights' dtype; the "
            "fp32 rows add 4 B/param (fp32 states) and 8 B/param (fp32 master weights and states, the usual mixed "
            f"precision). {GPU_BYTES // GIB} GiB is the whole card (CUDA context and fragmentation not counted).")


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="random-135m,random-360m,random-1.1b",
                        help=f"comma-separated models, smallest first (default: the three smallest of "
                        f"{', '.join(RANDOM_LLAMAS)}); tiny-random too")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--shapes", default="2x32,8x32", help="batch shapes BATCHxTOKENS (default 2x32,8x32)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1; 0: torch's)")
    parser.add_argument("--steps", type=int, default=2, help="iterations per batch shape (default 2: AdamW holds "
                        "its states beside the activations from the second on)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="update the scaling section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        parser.error(str(err))
    bad = [m for m in methods + ([args.worker[1]] if args.worker else []) if m not in METHODS]
    if bad:
        parser.error(f"unknown method {bad[0]!r}; accepted: {', '.join(METHODS)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.worker:
        print(json.dumps(worker(*args.worker, shapes, args.device, args.dtype, args.threads, args.steps)))
        return []
    if len(set(sizes)) < 2 or len({b * s for b, s in shapes}) < 2:
        parser.error("the fit needs two model sizes or more (--sizes) and two token counts or more (--shapes)")
    points = measure(sizes, methods, shapes, args.device, args.dtype, args.threads, args.steps)
    header, rows, proj, measured, fits = tables(points)
    cuda = args.device.startswith("cuda")
    title = (f"Memory scaling in {args.dtype} on {'CUDA' if cuda else 'CPU'}: models {', '.join(sizes)} (Llama shapes "
             f"with random weights), batch shapes {', '.join(f'{b} x {s}' for b, s in shapes)} (backprop + AdamW on "
             f"{sizes[-1]}: the first only), {args.steps} step(s) each; peak = a x params + b x tokens x layers x "
             f"hidden + c fitted per method by least squares; the last column projects each fit to OPT's shapes at "
             f"{TARGET[0]} x {TARGET[1]} tokens on one {GPU_BYTES // GIB} GiB GPU.")
    notes = "\n\n".join([
        f"Projected peak at {TARGET[0]} x {TARGET[1]} tokens (GiB):", proj,
        "Measured points (each (model, method) in its own process; shapes in turn, smallest first, the high-water "
        "mark reset before each):", measured, assumptions(args.dtype, args.device), OFFLOADING])
    section = "scaling_cuda" if cuda else "scaling"
    publish(section, "Memory scaling" + (" (CUDA)" if cuda else ""), title, header, rows, args.device, args.write,
            notes=notes, params={"sizes": sizes, "shapes": [list(s) for s in shapes], "dtype": args.dtype,
                                 "points": points, "fits": fits})
    return rows


if __name__ == "__main__":
    main()
