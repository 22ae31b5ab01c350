"""Time of one checkpoint write deep into a run: appending the step's record (``save_checkpoint``) against
rewriting the whole trajectory each step (what checkpoints did before trajectory.jsonl).

The optimizer holds ``--steps`` synthetic records shaped like a real run's (one seed, one gradient, one lr and
the loss per step); the script checkpoints them once, then times ``--repeat`` further steps, each a new record
and a checkpoint. Prints the median milliseconds per checkpoint for both ways.

    python benchmarks/checkpoint_write.py --steps 10000 50000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zo_objectives.checkpoint import canonical, save_checkpoint, text_sha256  # noqa: E402
from zo_objectives.estimators import MeZO  # noqa: E402
from zo_objectives.runfolder import atomic_write  # noqa: E402


def rewrite_checkpoint(run_dir: Path, optimizer: MeZO, step: int, base_sha256: str) -> None:
    """The former checkpoint: the whole state with every record, its checksum, one file written atomically."""
    state = optimizer.state_dict()
    state["mezo"]["trajectory"] = state["mezo"]["trajectory"][:step]
    body = canonical({"step": step, "optimizer": state})
    integrity = {"records": step, "sha256": text_sha256(body), "base_sha256": base_sha256}
    text = f'{body[:-1]},"integrity":{canonical(integrity)}}}'
    atomic_write(run_dir / "trajectory.json", lambda tmp: Path(tmp).write_text(text))


def record(i: int) -> dict:
    return {"seeds": [(i * 2654435761) % 2**63], "grads": [0.123456789 * (i % 97 - 48)], "lrs": [1e-5],
            "loss": 0.6931 + i * 1e-7}


def median_ms(save, steps: int, repeat: int) -> float:
    opt = MeZO([torch.zeros(4, requires_grad=True)], lr=1e-5, noise="gaussian")
    opt.trajectory = [record(i) for i in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp), opt, steps, "base")
        times = []
        for i in range(steps, steps + repeat):
            opt.trajectory.append(record(i))
            t0 = time.perf_counter()
            save(Path(tmp), opt, i + 1, "base")
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    rows = [{"steps": n, "append_ms": median_ms(save_checkpoint, n, args.repeat),
             "rewrite_ms": median_ms(rewrite_checkpoint, n, args.repeat)} for n in args.steps]
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return rows


if __name__ == "__main__":
    main()
