"""Peak memory of inference, MeZO training (ours and the reference step) and backprop + AdamW.

Each configuration runs in its own subprocess (this script with ``--config NAME``), which loads the model
and the fixed batch (16 x 64 random token ids), reads every weight once (transformers maps the safetensors
file lazily, so the weights are not resident until touched), records its resident set size ("loaded"), resets the
kernel's high-water mark where Linux allows it (``/proc/self/clear_refs``), runs a few iterations and
reports the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
Goal: MeZO's peak <= 1.05 x inference's.

    python benchmarks/memory.py                          # SmolLM2-135M
    python benchmarks/memory.py --model tiny-random
    python benchmarks/memory.py --write                  # update the memory section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import forward, label_word_loss, publish, setup  # noqa: E402
from reference_mezo import reference_step  # noqa: E402

from zo_objectives.optimizer import MeZO  # noqa: E402

CONFIGS = {
    "inference": "one forward pass (logits_to_keep=1, inference mode)",
    "mezo": "our MeZO (table noise, central difference)",
    "mezo-gaussian": "our MeZO (gaussian noise)",
    "reference": "reference MeZO step",
    "adamw": "backprop + AdamW (train mode, full-logits cross-entropy)",
}
MIB = 1024 * 1024


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


def run_config(name: str, model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int,
               steps: int = 3) -> dict:
    """Run one configuration in this process; return its memory figures (KiB and bytes)."""
    model, batch = setup(model_name, device, threads, batch_size, seq_len)
    cuda = device.startswith("cuda")
    with torch.no_grad():  # from_pretrained maps the safetensors file lazily: page the weights in before "loaded"
        for p in model.parameters():
            p.sum()
    gc.collect()
    loaded = current_rss_kib()
    peak_reset = reset_peak()
    if cuda:
        torch.cuda.synchronize()
        cuda_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> float:
        return label_word_loss(model, batch)

    if name == "inference":
        for _ in range(steps):
            forward(model, batch, keep=1)
    elif name in ("mezo", "mezo-gaussian"):
        opt = MeZO(params, lr=1e-6, eps=1e-3, noise="gaussian" if name == "mezo-gaussian" else "table")
        for _ in range(steps):
            opt.step(closure)
    elif name == "reference":
        for seed in range(steps):
            reference_step(model, closure, lr=1e-6, eps=1e-3, seed=seed)
    elif name == "adamw":
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
    else:
        raise ValueError(f"unknown config {name!r}; accepted: {', '.join(CONFIGS)}")
    result = {"config": name, "loaded_kib": loaded, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "peak_reset": peak_reset}
    if cuda:
        torch.cuda.synchronize()
        result.update(cuda_loaded=cuda_loaded, cuda_peak=torch.cuda.max_memory_allocated())
    return result


def measure(model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int,
            configs: list[str] | None = None, steps: int = 3) -> list[dict]:
    """Run each configuration in a fresh subprocess; return their results."""
    results = []
    for name in configs or list(CONFIGS):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", name, "--model", model_name,
               "--device", device, "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"config {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def rows(results: list[dict]) -> tuple[list[str], list[list]]:
    base = next((r for r in results if r["config"] == "inference"), None)
    cuda = any("cuda_peak" in r for r in results)
    header = ["config", "what", "loaded RSS MiB", "peak RSS MiB", "peak - loaded MiB", "peak / inference peak"]
    if cuda:
        header += ["CUDA loaded MiB", "CUDA peak MiB", "CUDA peak / inference"]
    out = []
    for r in results:
        row = [r["config"], CONFIGS[r["config"]], f"{r['loaded_kib'] / 1024:.0f}", f"{r['peak_kib'] / 1024:.0f}",
               f"{(r['peak_kib'] - r['loaded_kib']) / 1024:.0f}",
               f"{r['peak_kib'] / base['peak_kib']:.3f}" if base else "-"]
        if cuda:
            row += [f"{r['cuda_loaded'] / MIB:.0f}", f"{r['cuda_peak'] / MIB:.0f}",
                    f"{r['cuda_peak'] / base['cuda_peak']:.3f}" if base else "-"]
        out.append(row)
    return header, out


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny-random, or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="iterations per configuration (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke check: one iteration per configuration")
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    parser.add_argument("--write", action="store_true", help="update the memory section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 1
    if args.config:
        print(json.dumps(run_config(args.config, args.model, args.device, args.threads, args.batch_size,
                                    args.seq_len, args.steps)))
        return []
    configs = args.configs.split(",") if args.configs else None
    results = measure(args.model, args.device, args.threads, args.batch_size, args.seq_len, configs, args.steps)
    header, table = rows(results)
    reset = all(r["peak_reset"] for r in results)
    title = (f"Memory: {args.model}, batch {args.batch_size} x {args.seq_len} tokens, device {args.device}, "
             f"{args.steps} iteration(s) per configuration, each "
             f"configuration in its own process. \"loaded\" is the RSS after loading the model and the batch; "
             f"the peak is ru_maxrss " + ("measured from the loaded state (high-water mark reset after loading)."
                                          if reset else "since process start (the high-water mark could not be "
                                          "reset, so it includes loading)."))
    publish("memory", "Memory", title, header, table, args.device, args.write, notes="Goal: mezo / inference <= 1.05.",
            params={"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len})
    return table


if __name__ == "__main__":
    main()
