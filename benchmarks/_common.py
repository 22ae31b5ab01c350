"""Helpers shared by the benchmark scripts: model and batch setup, environment facts, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def setup(model_name: str, device: str, threads: int | None, batch_size: int, seq_len: int, seed: int = 0):
    """Load the model (eval mode, on ``device``) and a fixed batch of random token ids with a full mask.

    Returns ``(model, batch)`` where ``batch`` holds input_ids, attention_mask, position_ids (as the
    scoring code builds them for unpadded rows), labels (one class per row) and label_ids (two tokens).
    """
    if threads:
        torch.set_num_threads(threads)
    from zo_objectives.models import load_model

    model, _ = load_model(model_name)
    model = model.to(device).eval()
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
    ``keep=0`` means all positions' logits)."""
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
    return out.logits


def label_word_loss(model: torch.nn.Module, batch: dict) -> float:
    """The closure a MeZO step scores: LabelWords' cross-entropy over two label words at the next position."""
    logits = forward(model, batch, keep=1)[:, -1].float()
    return float(torch.nn.functional.cross_entropy(logits[:, batch["label_ids"]], batch["labels"]))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def this_environment(device: str) -> str:
    """One markdown paragraph: the command, date, torch version, threads, CPU (and GPU)."""
    command = "python " + " ".join(shlex.quote(a) for a in [_relative(sys.argv[0]), *sys.argv[1:]])
    facts = [f"command: `{command}`",
             f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"torch {torch.__version__}", f"threads: {torch.get_num_threads()}",
             f"CPU: {cpu_model()}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        facts.append(f"GPU: {torch.cuda.get_device_name(torch.device(device))}")
    return "; ".join(facts) + "."


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
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/` " \
        "(`--write`); the text between the markers of each section is replaced on each run.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def publish(section: str, heading: str, title: str, table: str, device: str, write: bool, notes: str = "",
            environment: str | None = None) -> str:
    """Print ``title``, ``table`` and the environment line (this machine's, unless ``environment`` describes
    where the results were measured); with ``write``, store them (and ``notes``) as the ``section`` of
    BENCHMARKS.md under ``## heading``. Returns the printed text."""
    here = this_environment(device)
    text = f"{title}\n\n{table}\n\n{here if environment is None else f'{environment} Tabulated here: {here}'}\n"
    print(text)
    if write:
        write_section(section, f"## {heading}\n\n{text}\n{notes}")
    return text
