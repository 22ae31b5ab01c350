"""Peak memory of inference, MeZO training (ours and the reference step), backprop + AdamW and LoRA.

Each configuration runs in its own subprocess (this script with ``--config NAME``), which loads the model
(in ``--dtype``) and the fixed batch (16 x 64 random token ids), reads every weight once (transformers maps the
safetensors file lazily, so the weights are not resident until touched), records its resident set size
("loaded"), resets the kernel's high-water mark where Linux allows it (``/proc/self/clear_refs``), runs a few
iterations and reports the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and, on CUDA,
``torch.cuda.max_memory_allocated``; each configuration in ``--processes`` processes (3), the median reported,
since one process's peak varies by tens of MiB. Goal: MeZO's peak <= 1.05 x inference's.

    python benchmarks/memory.py                          # SmolLM2-135M
    python benchmarks/memory.py --model tiny-random
    python benchmarks/memory.py --write                  # update the memory section of BENCHMARKS.md
    python benchmarks/memory.py --model random-1.1b --dtype bf16 --batch-size 2 --seq-len 32 --threads 1 --write
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DTYPES, RANDOM_LLAMAS, forward, label_word_loss, publish, setup  # noqa: E402
from reference_mezo import reference_step  # noqa: E402

from zo_objectives.estimators import MeZO  # noqa: E402
from zo_objectives.models import apply_peft  # noqa: E402

CONFIGS = {
    "inference": "one forward pass (logits_to_keep=1, inference mode)",
    "mezo": "our MeZO (table noise, central difference)",
    "mezo-gaussian": "our MeZO (gaussian noise)",
    "mezo-frozen-embeddings": "our MeZO, input embedding and LM head frozen (diagnostic)",
    "mezo-lora": "our MeZO on LoRA r=8 (q, v) only",
    "population": "a population step: one antithetic pair, each member on half the batch, rank 1",
    "fzoo": "an FZOO step: the unperturbed model and 3 one-sided members, each on a quarter of the batch",
    "reference": "reference MeZO step",
    "adamw": "backprop + AdamW (train mode, full-logits cross-entropy)",
    "lora": "backprop + AdamW on LoRA r=8 (q, v) only, as adamw (the MeZO paper's LoRA setting)",
}
MIB = 1024 * 1024
EMBEDDINGS = ("embed_tokens", "lm_head")


def current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed() -> None:
    """Collect garbage and hand freed heap back to the kernel (glibc), so that a later peak starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prepare(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The model a configuration trains: LoRA-wrapped for the LoRA ones, embeddings frozen for the diagnostic."""
    if name in ("lora", "mezo-lora"):
        model = apply_peft(model, "lora")
    if name == "mezo-frozen-embeddings":
        for param_name, p in model.named_parameters():
            p.requires_grad_(not any(e in param_name for e in EMBEDDINGS))
    return model


def page_in(model: torch.nn.Module) -> None:
    """Touch every weight once: from_pretrained maps the safetensors file lazily, so the weights are not resident
    until read."""
    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def run_steps(name: str, model: torch.nn.Module, batch: dict, steps: int) -> None:
    """``steps`` iterations of configuration ``name`` on ``batch`` (the model as ``prepare`` returned it)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> float:
        return label_word_loss(model, batch)

    if name == "inference":
        for _ in range(steps):
            forward(model, batch, keep=1)
    elif name.startswith("mezo"):
        opt = MeZO(params, lr=1e-6, eps=1e-3, noise="gaussian" if name == "mezo-gaussian" else "table")
        for _ in range(steps):
            opt.step(closure)
    elif name == "population":  # the same rows as inference: 2 members, each on half of the batch
        from zo_objectives.estimators import Population

        opt = Population(params, lr=1e-6, eps=1e-3, population=2)
        labels = batch["labels"]
        for _ in range(steps):
            opt.step(lambda: torch.nn.functional.cross_entropy(
                forward(model, batch, keep=1)[:, -1, batch["label_ids"]].float(), labels, reduction="none")
                .view(2, -1).mean(1))
    elif name == "fzoo":  # the same rows as inference: 4 members (the unperturbed one first), a quarter each
        from zo_objectives.estimators import FZOO

        opt = FZOO(params, eps=1e-3, n_perturbations=3)
        if batch["labels"].shape[0] % 4:  # a batch too small to split (the tests'): each member takes all of it
            batch = {k: v if k == "label_ids" else v.repeat(4, *[1] * (v.ndim - 1)) for k, v in batch.items()}
        labels = batch["labels"]
        for _ in range(steps):
            opt.step(lambda: torch.nn.functional.cross_entropy(
                forward(model, batch, keep=1)[:, -1, batch["label_ids"]].float(), labels, reduction="none")
                .view(4, -1).mean(1).tolist())
    elif name == "reference":
        for seed in range(steps):
            reference_step(model, closure, lr=1e-6, eps=1e-3, seed=seed)
    elif name in ("adamw", "lora"):
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        ids = batch["input_ids"]
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                           use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del logits, loss
        model.eval()
    else:
        raise ValueError(f"unknown config {name!r}; accepted: {', '.join(CONFIGS)}")


def run_config(name: str, model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int,
               steps: int = 3, dtype: str = "fp32") -> dict:
    """Run one configuration in this process; return its memory figures (KiB and bytes)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; accepted: {', '.join(CONFIGS)}")
    model, batch = setup(model_name, device, threads, batch_size, seq_len, dtype=dtype)
    model = prepare(name, model)
    page_in(model)
    cuda = device.startswith("cuda")
    release_freed()
    loaded = current_rss_kib()
    peak_reset = reset_peak()
    if cuda:
        torch.cuda.synchronize()
        cuda_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    run_steps(name, model, batch, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = {"config": name, "loaded_kib": loaded, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "peak_reset": peak_reset, "largest_trainable_bytes": max(p.numel() * p.element_size() for p in trainable)}
    if cuda:
        torch.cuda.synchronize()
        result.update(cuda_loaded=cuda_loaded, cuda_peak=torch.cuda.max_memory_allocated())
    return result


PROCESSES = 3  # fresh processes per configuration


def measure(model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int,
            configs: list[str] | None = None, steps: int = 3, dtype: str = "fp32",
            processes: int = PROCESSES) -> list[dict]:
    """Run each configuration in ``processes`` fresh subprocesses, in turn; return, per configuration, the result of
    the process with the median peak (the lower middle one for an even count), with every process's peak
    (``peaks_kib``).

    Why several: a process's peak RSS varies by tens of MiB from one run to the next (allocator and page-cache
    timing), as much as MeZO adds over inference."""
    names = configs or list(CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(processes):
        for name in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--config", name, "--model", model_name,
                   "--device", device, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
                   "--steps", str(steps), "--dtype", dtype]
            if threads:
                cmd += ["--threads", str(threads)]
            runs[name].append(run_worker(cmd, name))
    results = []
    for name in names:
        ordered = sorted(runs[name], key=lambda r: r["peak_kib"])
        results.append({**ordered[(len(ordered) - 1) // 2], "peaks_kib": [r["peak_kib"] for r in runs[name]]})
    return results


def run_worker(cmd: list[str], what: str) -> dict:
    """Run a worker subprocess that prints its result as JSON on its last line; return that result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(results: list[dict]) -> tuple[list[str], list[list]]:
    base = next((r for r in results if r["config"] == "inference"), None)
    cuda = any("cuda_peak" in r for r in results)
    header = ["config", "what", "loaded RSS MiB", "peak RSS MiB", "peak RSS range MiB", "peak - loaded MiB",
              "peak / inference peak"]
    if cuda:
        header += ["CUDA loaded MiB", "CUDA peak MiB", "CUDA peak / inference"]
    out = []
    for r in results:
        peaks = r.get("peaks_kib", [r["peak_kib"]])
        row = [r["config"], CONFIGS[r["config"]], f"{r['loaded_kib'] / 1024:.0f}", f"{r['peak_kib'] / 1024:.0f}",
               f"{min(peaks) / 1024:.0f}-{max(peaks) / 1024:.0f}", f"{(r['peak_kib'] - r['loaded_kib']) / 1024:.0f}",
               f"{r['peak_kib'] / base['peak_kib']:.3f}" if base else "-"]
        if cuda:
            row += [f"{r['cuda_loaded'] / MIB:.0f}", f"{r['cuda_peak'] / MIB:.0f}",
                    f"{r['cuda_peak'] / base['cuda_peak']:.3f}" if base else "-"]
        out.append(row)
    return header, out


def section_name(model_name: str, dtype: str) -> str:
    """``memory`` for the default (SmolLM2-135M in fp32, which README's summary reads), else
    ``memory_<model>_<dtype>``."""
    if (model_name, dtype) == ("smollm2-135m", "fp32"):
        return "memory"
    return f"memory_{Path(model_name).name}_{dtype}"


def notes(results: list[dict], dtype: str) -> str:
    """The goal and, from the results, whether it is met and where MeZO's extra memory comes from."""
    by = {r["config"]: r for r in results}
    text = "Goal: mezo / inference <= 1.05."
    if "inference" not in by or "mezo" not in by:
        return text
    base, mezo = by["inference"], by["mezo"]
    ratio = mezo["peak_kib"] / base["peak_kib"]
    text += (f" Measured: {ratio:.3f} ({'met' if ratio <= 1.05 else 'not met'}); MeZO peaks "
             f"{(mezo['peak_kib'] - base['peak_kib']) / 1024:.0f} MiB above inference. Its largest trainable tensor "
             f"is {mezo['largest_trainable_bytes'] / MIB:.0f} MiB in {dtype}; MeZO perturbs an embedding and an LM "
             "head through their outputs (no copy) and every other module's weight as a temporary copy while that "
             "module runs.")
    if "mezo-frozen-embeddings" in by:
        frozen = by["mezo-frozen-embeddings"]
        text += (f" With the input embedding and LM head frozen (largest trainable tensor "
                 f"{frozen['largest_trainable_bytes'] / MIB:.0f} MiB), MeZO peaks at "
                 f"{frozen['peak_kib'] / base['peak_kib']:.3f} x inference.")
        text += (" Forward passes hand the LM head a contiguous input, as scoring does (`scoring.model_device`): "
                 "over a frozen head (the frozen and LoRA rows), PyTorch's matmul of the strided slice that "
                 "logits_to_keep=1 makes copies the head's weight once per batch row (pytorch/pytorch#73115).")
    return text


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"smollm2-135m (default), tiny-random, {', '.join(RANDOM_LLAMAS)} (random weights), "
                        "or a path")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights' dtype (default fp32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="iterations per configuration (--quick: 1)")
    parser.add_argument("--processes", type=int, default=PROCESSES,
                        help="fresh processes per configuration; the median peak is reported (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke check: one iteration per configuration")
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    parser.add_argument("--write", action="store_true", help="update this model's memory section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [c for c in configs + ([args.config] if args.config else []) if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; accepted: {', '.join(CONFIGS)}")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.quick:
        args.steps, args.processes = 1, 1
    if args.config:
        print(json.dumps(run_config(args.config, args.model, args.device, args.threads, args.batch_size,
                                    args.seq_len, args.steps, args.dtype)))
        return []
    results = measure(args.model, args.device, args.threads, args.batch_size, args.seq_len, configs, args.steps,
                      args.dtype, args.processes)
    header, table = rows(results)
    reset = all(r["peak_reset"] for r in results)
    title = (f"Memory: {args.model} in {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, device "
             f"{args.device}, {args.steps} iteration(s) per configuration, each configuration in "
             f"{args.processes} fresh process(es) in turn, the one with the median peak reported (the range: all of "
             f"them). \"loaded\" is the RSS after loading the model and the batch; "
             f"the peak is ru_maxrss " + ("measured from the loaded state (high-water mark reset after loading)."
                                          if reset else "since process start (the high-water mark could not be "
                                          "reset, so it includes loading)."))
    section = section_name(args.model, args.dtype)
    heading = "Memory" if section == "memory" else f"Memory ({args.model}, {args.dtype})"
    publish(section, heading, title, header, table, args.device, args.write, notes=notes(results, args.dtype),
            params={"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len})
    return table


if __name__ == "__main__":
    main()
