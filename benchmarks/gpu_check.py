"""The GPU check of half precision, prepared to run in a few minutes on one GPU:

1. exactness on CUDA: lr 0 and a failed step leave the weights bitwise unchanged (fp32, bf16, fp16), replay
   rebuilds bf16 training bitwise, and a bf16 update of ~0.1 ulp keeps its length on average; the fused bf16
   update (Triton) is used and trains bitwise like the eager kernels;
2. step / (2 x forward) in bf16 for SmolLM2-135M's shape and a 1.1B Llama shape (random weights), with the
   default noise chunks and with GPU-sized ones;
3. one MeZO run of a few steps on a ~32B Llama shape (LLaMA-33B: hidden 6656, 60 layers) in bf16 on one 80 GB
   GPU, with peak memory beside inference's.

Each result is printed and saved as JSON under ``--out``; ``python benchmarks/gpu_check.py --store DIR`` then
files them into benchmarks/results and BENCHMARKS.md here. ``--smoke`` runs everything tiny on the CPU.

    python benchmarks/gpu_check.py --out $OUT                # on the GPU machine
    python benchmarks/gpu_check.py --store /path/to/out       # here, afterwards
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
# Only the optimizer is needed: load zo_objectives' modules without its __init__ (whose data-loading imports the
# GPU image may lack).
if "zo_objectives" not in sys.modules:
    package = types.ModuleType("zo_objectives")
    package.__path__ = [str(ROOT / "zo_objectives")]
    sys.modules["zo_objectives"] = package

import _common  # noqa: E402
import step_speed  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from zo_objectives.checkpoint import replay  # noqa: E402
from zo_objectives.estimators import MeZO  # noqa: E402

LLAMA_33B = dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                 num_key_value_heads=52, vocab_size=32000, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=False)


def llama(shape: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(max_position_embeddings=2048, **shape), dtype=dtype)
    return model.eval()


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def exactness(device: str) -> dict:
    """Rows: dtype, lr-0 bitwise after 10 steps, failed step bitwise, replay bitwise, mean update kept."""
    rows = []
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    for name, dtype in _common.DTYPES.items():
        model = llama(TINY, dtype, device)
        loss = lambda m=model: m(input_ids=ids, labels=ids).loss  # noqa: E731
        base = snapshot(model)
        opt = MeZO(model.parameters(), lr=0.0, eps=1e-3)
        for _ in range(10):
            opt.step(loss)
        lr0 = same(snapshot(model), base)
        opt.param_groups[0]["lr"] = 1e-3
        opt.step(loss)
        before = snapshot(model)
        calls: list[int] = []

        def failing(m=model, calls=calls):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return m(input_ids=ids, labels=ids).loss

        try:
            opt.step(failing)
        except KeyboardInterrupt:
            pass
        failed = same(snapshot(model), before)
        for _ in range(3):
            opt.step(loss)
        fresh = llama(TINY, dtype, device)
        replay(fresh.parameters(), json.loads(json.dumps(opt.state_dict())))
        replayed = same(snapshot(fresh), snapshot(model))
        rows.append([name, lr0, failed, replayed, f"{kept_update(dtype, device):.3f}"])
    header = ["dtype", "lr 0, 10 steps: bitwise", "interrupted step: bitwise", "replay: bitwise",
              "0.1-ulp update kept on average (1 = unbiased; fp32 rounds to nearest)"]
    return _common.publish(f"gpu_exactness_{device.split(':')[0]}", "Exactness on the GPU",
                           "Exactness of MeZO's on-the-fly perturbation and stochastically rounded updates, on "
                           "a 2-layer random Llama (and 4M weights of 0.02 for the last column).",
                           header, rows, device, write=False)


def fused_update(device: str) -> dict:
    """Whether the fused bf16 update (Triton) runs here, and 5 bf16 steps with it against the eager kernels."""
    from zo_objectives import fused

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def run(allowed: bool) -> list[torch.Tensor]:
        model = llama(TINY, torch.bfloat16, device)
        opt = MeZO(model.parameters(), lr=1e-3, eps=3e-3, weight_decay=0.1)
        real = fused.update
        fused.update = real if allowed else (lambda *a: False)
        try:
            for _ in range(5):
                opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        finally:
            fused.update = real
        return snapshot(model)

    same_weights = same(run(True), run(False))
    rows = [[str(fused._kernel() is not None), str(fused._checked.get(torch.device(device), False)), same_weights]]
    return _common.publish(f"fused_update_{device.split(':')[0]}", "Fused bf16 update on the GPU",
                           "The Triton update kernel: available, bitwise equal to the eager kernels at its first "
                           "use (else unused), and 5 bf16 steps of a 2-layer random Llama with it against without.",
                           ["Triton kernel", "used (agreed at first use)", "5 steps: bitwise"], rows, device,
                           write=False)


def kept_update(dtype: torch.dtype, device: str) -> float:
    """Projection of one update of ~0.1 ulp on 4M weights near 0.02 onto the exact update (1 = unbiased)."""
    w = torch.nn.Parameter((torch.randn(1 << 22, generator=torch.Generator().manual_seed(1)) * 0.02).to(device, dtype))
    holder = torch.nn.Module()
    holder.w = w
    before = w.detach().double().clone()
    mantissa = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    opt = MeZO([w], lr=0.1 * 2.0 ** (-6 - mantissa) / 500, eps=1e-3, seed=3)
    losses = iter([1.0, 0.0])
    opt.step(lambda: (holder.w.sum(), next(losses))[1])
    z = torch.cat([c.double() for _, c in opt.noise.chunks(opt.trajectory[0]["seeds"][0], 0, w.detach())])
    exact = -opt.param_groups[0]["lr"] * opt.trajectory[0]["grads"][0] * z
    return float((w.detach().double() - before) @ exact / (exact @ exact))


def speed(model_name: str, device: str, batch: int, seq: int, repeats: int) -> dict:
    rows = []
    model, data = _common.setup(model_name, device, None, batch, seq, dtype="bf16")
    for label, sizes in (("CPU-sized (2^18)", {"chunk_size": 1 << 18, "table_size": 1 << 22}),
                         ("GPU default (2^24)", {})):
        configs = step_speed.configurations(model, data, overhead=False, sizes=sizes)
        keep = ("MeZO table", "forward") if label.startswith("CPU") else ("MeZO", "forward", "reference")
        configs = {k: v for k, v in configs.items() if k.startswith(keep)}
        times = step_speed.measure(configs, repeats, device, warmup=2)
        rows += [[label, *row] for row in step_speed.rows(configs, times)]
    n = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return _common.publish(f"step_speed_{model_name}_bf16_{device.split(':')[0]}",
                           f"Step speed ({model_name}, bf16, {device.split(':')[0]})",
                           f"Step speed: {model_name} (random weights, {n / 1e6:.0f}M parameters), bf16, batch "
                           f"{batch} x {seq} tokens, median of {repeats} interleaved repeats.",
                           ["noise chunks", *step_speed.HEADER], rows, device, write=False,
                           params={"model": model_name, "dtype": "bf16", "batch_size": batch, "seq_len": seq})


def large(device: str, shape: dict, batch: int, seq: int, steps: int) -> dict:
    """A few MeZO steps on a large random Llama: peak memory of training beside inference's, and step time."""
    model = llama(shape, torch.bfloat16, device)
    n = sum(p.numel() for p in model.parameters())
    data = {"input_ids": torch.randint(0, shape["vocab_size"], (batch, seq), device=device)}
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    data["position_ids"] = (data["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    data["labels"] = torch.randint(0, 2, (batch,), device=device)
    data["label_ids"] = torch.tensor([100, 200], device=device)
    cuda = device.startswith("cuda")

    def peak(fn) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() if cuda else 0) / 2**30

    weights = (torch.cuda.memory_allocated() if cuda else 0) / 2**30
    peak(lambda: _common.forward(model, data))
    forward_s, inference_gib = peak(lambda: _common.forward(model, data))
    opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)  # GPU-sized noise chunks by default
    closure = lambda: _common.label_word_loss(model, data)  # noqa: E731
    peak(lambda: opt.step(closure))
    step_s, mezo_gib = zip(*(peak(lambda: opt.step(closure)) for _ in range(steps)))
    step_med, mezo_peak = sorted(step_s)[len(step_s) // 2], max(mezo_gib)
    rows = [[f"{n / 1e9:.1f}B", f"{weights:.1f}", f"{inference_gib:.1f}", f"{mezo_peak:.1f}",
             f"{mezo_peak / inference_gib:.3f}" if inference_gib else "-", f"{forward_s:.3f}", f"{step_med:.3f}",
             f"{step_med / (2 * forward_s):.3f}"]]
    header = ["parameters", "weights GiB", "inference peak GiB", "MeZO peak GiB", "MeZO / inference",
              "forward s", "MeZO step s", "step / (2 x forward)"]
    return _common.publish(f"large_model_{device.split(':')[0]}", "One GPU: a 32B Llama shape tuned by MeZO in bf16",
                           f"MeZO on a random Llama of LLaMA-33B's shape (hidden {shape['hidden_size']}, "
                           f"{shape['num_hidden_layers']} layers), bf16, batch {batch} x {seq} tokens, {steps + 1} "
                           "steps (the first untimed); peak = torch.cuda.max_memory_allocated.",
                           header, rows, device, write=False,
                           params={"batch_size": batch, "seq_len": seq, "parameters": n})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_results", help="folder for the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--store", metavar="DIR", help="file the JSON results of DIR into benchmarks/results")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args(argv)
    if args.store:
        for path in sorted(Path(args.store).glob("*.json")):
            _common.store(json.loads(path.read_text()))
            print(f"stored {path.name}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    jobs = [("exactness", lambda: exactness(device)), ("fused", lambda: fused_update(device))]
    if args.smoke:
        jobs += [("speed_tiny", lambda: speed("tiny-random", device, 2, 16, 1)),
                 ("large", lambda: large(device, TINY, 2, 16, 2))]
    else:
        jobs += [("speed_135m", lambda: speed("random-135m", device, 16, 64, 5)),
                 ("speed_1.1b", lambda: speed("random-1.1b", device, 16, 64, 5))]
        if not args.skip_large:
            jobs.append(("large", lambda: large(device, LLAMA_33B, 16, 256, 3)))
    for name, job in jobs:
        t0 = time.perf_counter()
        try:
            result = job()
        except Exception as err:  # keep the other results: GPU time is short
            print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
            continue
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
