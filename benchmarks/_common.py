"""Helpers shared by the benchmark scripts: model and batch setup, environment facts, and results.

Each result is stored twice by ``publish(..., write=True)``: as data in ``benchmarks/results/<section>.json`` and as
its section of BENCHMARKS.md, rendered from that data (``render``), so that README and docs can be checked against
the JSON."""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Llama shapes with random weights (no download): SmolLM2-135M's and -360M's, TinyLlama-1.1B's (hidden 2048,
# 22 layers), and LLaMA-7B's, -13B's and -33B's (Touvron et al., 2023; for a GPU: built on the device)
RANDOM_LLAMAS = {
    "random-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "random-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "random-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "random-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "random-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "random-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                       num_key_value_heads=52, vocab_size=32000, tie_word_embeddings=False),
    # a Llama whose compute is negligible at 1 x 8 tokens: step_speed.py --proxy, for the GPU's launch-bound regime
    "random-proxy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}


def build_model(model_name: str, dtype: str = "fp32") -> torch.nn.Module:
    """A shipped or local model (``load_model``), or a Llama of a ``RANDOM_LLAMAS`` shape built in ``dtype``."""
    if model_name in RANDOM_LLAMAS:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(max_position_embeddings=2048, **RANDOM_LLAMAS[model_name])
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).eval()
    from zo_objectives.models import load_model

    return load_model(model_name, dtype=DTYPES[dtype])[0]


def setup(model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int, seed: int = 0,
          dtype: str = "fp32"):
    """Load the model (eval mode, on ``device``, in ``dtype``) and a fixed batch of random token ids with a full
    mask.

    Returns ``(model, batch)`` where ``batch`` holds input_ids, attention_mask, position_ids (as the
    scoring code builds them for unpadded rows), labels (one class per row) and label_ids (two tokens).
    """
    if threads:
        torch.set_num_threads(threads)
    model = build_model(model_name, dtype).to(device=device, dtype=DTYPES[dtype]).eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
             "labels": torch.randint(0, 2, (batch_size,), generator=gen).to(device),
             "label_ids": torch.tensor([vocab // 3, 2 * vocab // 3], device=device)}
    return model, batch


def forward(model: torch.nn.Module, batch: dict, keep: int = 1) -> torch.Tensor:
    """One forward pass as ``scoring.Predictor._forward`` runs it (no KV cache, last ``keep`` logits;
    ``keep=0`` means all positions' logits), its LM head handed a contiguous input as scoring's is."""
    from zo_objectives.scoring import model_device

    model_device(model)
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
    return out.logits


def label_word_loss(model: torch.nn.Module, batch: dict) -> float:
    """The closure a MeZO step scores: LabelWordPredictor' cross-entropy over two label words at the next position."""
    logits = forward(model, batch, keep=1)[:, -1].float()
    return float(torch.nn.functional.cross_entropy(logits[:, batch["label_ids"]], batch["labels"]))


def this_environment(device: str) -> dict:
    """Where and how this invocation runs: command, date, hardware, library versions, threads."""
    import transformers

    command = "python " + " ".join(shlex.quote(a) for a in [_relative(sys.argv[0]), *sys.argv[1:]])
    from zo_objectives.models import cpu_has_bf16, cpu_name

    gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": "cuda" if gpu else "cpu",
            "hardware": torch.cuda.get_device_name(torch.device(device)) if gpu else cpu_name(),
            **({} if gpu else {"native_bf16": cpu_has_bf16()}),
            "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (appending the
    section, or creating the file, when missing); everything else in the file is kept as it was."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def environment_name(env: dict) -> str:
    """The row of BENCHMARKS.md's environments table a result belongs to: device, hardware and versions."""
    return (f"{env.get('device', 'cpu').upper()}: {env.get('hardware') or 'not recorded'}, torch "
            f"{env.get('torch') or 'not recorded'}, transformers {env.get('transformers') or 'not recorded'}")


def render(result: dict) -> str:
    """A result's BENCHMARKS.md section: heading, caption, table, where and how it was measured, notes."""
    env = result["environment"]
    where = f"Environment: {environment_name(env)}; threads: {env.get('threads') or 'not recorded'}."
    how = f"Command: `{env['command']}`" + (f" ({env['date']})." if env.get("date") else ".")
    if "tabulated_by" in result:  # its command is in the JSON: it repeats the measuring one
        how += f" Tabulated from the run folders on {result['tabulated_by']['date']}."
    parts = [f"## {result['heading']}", result["title"], markdown_table(result["columns"], result["rows"]),
             f"{where} {how}", result.get("notes", "")]
    return "\n\n".join(p for p in parts if p) + "\n"


def load_results(results: Path | None = None) -> dict[str, dict]:
    """Every stored result, by section name."""
    folder = results or RESULTS
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def environments_table(results: dict[str, dict]) -> str:
    """The environments table at the top of BENCHMARKS.md: each machine and library versions, and its results."""
    by_env: dict[str, list[str]] = {}
    for name, result in results.items():  # one seed of objective_gap.py shows in its task's seeds table
        if "seed" not in result["params"]:
            by_env.setdefault(environment_name(result["environment"]), []).append(name)
    rows = []
    for names in (by_env[key] for key in sorted(by_env)):
        env = results[names[0]]["environment"]
        cores = f" ({env['cores']} cores)" if env.get("cores") else ""
        rows.append([env.get("device", "cpu").upper(), f"{env.get('hardware') or 'not recorded'}{cores}",
                     env.get("torch") or "not recorded", env.get("transformers") or "not recorded",
                     ", ".join(names)])
    return "## Environments\n\n" + markdown_table(["device", "hardware", "torch", "transformers", "results"], rows)


def to_json(data: dict) -> str:
    """Indented JSON with each list of plain values (a table row, a header) on one line."""
    text = json.dumps(data, indent=1)
    one_line = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    return one_line + "\n"


def store(result: dict, section: bool = True) -> None:
    """Write ``result`` as ``RESULTS/<section>.json`` and, with ``section``, its BENCHMARKS.md section; then
    BENCHMARKS.md's environments table from every stored result."""
    folder = RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['section']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_json(result))
    tmp.replace(path)
    if section:
        write_section(result["section"], render(result), BENCHMARKS_MD)
    write_section("environments", environments_table(load_results(folder)), BENCHMARKS_MD)


def publish(section: str, heading: str, title: str, header: list[str], rows: list[list], device: str, write: bool,
            notes: str = "", environment: dict | None = None, params: dict | None = None,
            markdown: bool = True) -> dict:
    """Print a result (caption ``title``, table, this machine's environment, or ``environment``'s entries over
    it for results measured elsewhere); with ``write``, store it (``store``). ``params`` holds the settings
    other code reads back (seed, task, ...); ``markdown=False`` stores the JSON only (a section built from
    several results renders it). Returns the result."""
    here = this_environment(device)
    result = {"section": section, "heading": heading, "title": title, "columns": header,
              "rows": [[str(c) for c in row] for row in rows], "notes": notes, "params": params or {},
              "environment": {**here, **environment} if environment else here}
    if environment:
        result["tabulated_by"] = {"command": here["command"], "date": here["date"]}
    print(render(result))
    if write:
        store(result, section=markdown)
    return result
