"""The run folder as one unit: its files, the lock a run holds on it, and the manifest that ties them together.

A ``zo-tune`` run folder holds ``config.json`` (the settings), ``eval.json``, ``metrics.jsonl`` (a row per
step), the checkpoint (``trajectory.json``, a small head, and ``trajectory.jsonl``, the records it covers),
``model.safetensors`` and ``curve.png``. ``manifest.json`` names the run (a random id the checkpoint repeats)
and holds the sha256 of config.json, eval.json and model.safetensors (with the step the weights are of), so a
file edited, damaged or copied in from another run is refused on ``--resume``, by ``zo-eval --run`` and by
``zo-export`` with one line naming it. A run holds an exclusive lock on its folder (``.zo-lock``) from its
checks to its end.

Every file is written to a hidden temporary name beside it and renamed into place (a crash leaves the old
file or the new one); a run removes the temporaries a killed run left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

CONFIG, EVAL, LOG, CURVE = "config.json", "eval.json", "metrics.jsonl", "curve.png"
CHECKPOINT, RECORDS = "trajectory.json", "trajectory.jsonl"
WEIGHTS, MANIFEST, LOCK = "model.safetensors", "manifest.json", ".zo-lock"
RUN_FILES = (CONFIG, EVAL, LOG, CURVE, CHECKPOINT, RECORDS, WEIGHTS, MANIFEST)  # what a run writes
COMPLETIONS = "completions.jsonl"  # what a generation or reward run writes too: a sample of its completions
TENSORBOARD = "tb"  # and, with --report-to tensorboard, its TensorBoard log folder


def atomic_write(path: Path, write: Callable[[str], None], before_rename: Callable[[str], None] | None = None) -> None:
    """Call ``write(tmp_path)`` (then ``before_rename(tmp_path)``), then rename the file over ``path``. The file
    gets the mode of any other new file (0644 under the usual umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)  # (some writers, safetensors' among them, create the file anew)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if before_rename:
            before_rename(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a ValueError naming the file when it is missing, truncated or not UTF-8."""
    try:
        return json.loads(Path(path).read_bytes().decode())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (damaged or truncated: {err})") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the lock -------------------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # folders this process has locked, with how many holders (train() inside tune())


@contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock (re-entrant within a process); a ValueError naming the folder when
    another process holds it."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(key / LOCK, timeout=0)
    try:
        file_lock.acquire()
    except Timeout:
        raise ValueError(f"run folder {run_dir} is in use by another run (it holds {key / LOCK}); wait for it to "
                         "end or use another --output-dir") from None
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        file_lock.release()


# --- what is in a folder --------------------------------------------------------------------------------------

def _ours(name: str) -> bool:
    """A file a run writes, its lock, or a temporary left by one killed while writing."""
    return (name in (*RUN_FILES, COMPLETIONS, TENSORBOARD) or name == LOCK
            or any(name.startswith(f".{f}.") for f in RUN_FILES))


def left_before_first_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run that stopped before its first checkpoint leaves (settings, the
    evaluation before tuning, no checkpoint, and no more logged steps than come before the first checkpoint, a
    kill or a full disk between them): nothing to resume, nothing that a run from step 0 would not write again.
    A folder with more logged steps than that lost its checkpoint: it is not reused."""
    names = {p.name for p in Path(run_dir).iterdir()}
    if not (all(_ours(n) for n in names) and CONFIG in names and not {CHECKPOINT, WEIGHTS} & names):
        return False
    log = Path(run_dir) / LOG
    rows = log.read_bytes().count(b"\n") if log.exists() else 0
    if not rows:
        return True
    try:  # the first checkpoint's step: at --checkpoint-every, the first evaluation, or the end
        config = json.loads((Path(run_dir) / CONFIG).read_text())
        first = min(v for v in (config.get("checkpoint_every"), config.get("eval_every"), config.get("steps"))
                    if isinstance(v, int) and v > 0)
    except (OSError, ValueError, AttributeError):  # unreadable settings: not a folder to reuse blindly
        return False
    return rows <= first


def holds_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists with anything in it besides the lock and temporaries a killed run left."""
    return Path(run_dir).is_dir() and any(
        p.name != LOCK and not (_ours(p.name) and p.name.startswith(".")) for p in Path(run_dir).iterdir())


def clean(run_dir: Path, everything: bool = False) -> list[str]:
    """Remove the temporaries killed runs left (and with ``everything``, every file a run writes and its
    TensorBoard folder: an earlier run's curves would be drawn over the new one's); return the names removed."""
    removed = []
    for p in Path(run_dir).iterdir():
        if p.name != LOCK and _ours(p.name) and (everything or p.name.startswith(".")) and p.is_file():
            p.unlink()
            removed.append(p.name)
        elif everything and p.name == TENSORBOARD and p.is_dir():
            shutil.rmtree(p)
            removed.append(p.name)
    return sorted(removed)


# --- the manifest ---------------------------------------------------------------------------------------------

def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise ValueError(f"{run_dir} has no {MANIFEST}: not a zo-tune run folder, or one an older version wrote "
                         "(start the run again)")
    try:
        manifest = read_json(path)
    except ValueError as err:
        raise ValueError(f"{err}: the run folder's record of its files is damaged") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("run"), str)
            and isinstance(manifest.get("files"), dict)):
        raise ValueError(f"{path} is malformed (expected a run id and files): the run folder's record of its files "
                         "is damaged")
    sealed = manifest.pop("sha256", None)  # absent in the manifests of older versions
    if sealed is not None and sealed != _manifest_sha256(manifest):
        raise ValueError(f"{path} was changed or damaged after the run wrote it (its own sha256 does not match its "
                         "content): the run folder's record of its files cannot be trusted")
    return manifest


def _manifest_sha256(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    """Write the manifest with its own sha256, so that damage to it is reported as damage to it."""
    content = {k: v for k, v in manifest.items() if k != "sha256"}
    write_json(Path(run_dir) / MANIFEST, {**content, "sha256": _manifest_sha256(content)})


def new_manifest(run_dir: Path) -> str:
    """Start the manifest of a new run; return its run id."""
    run = uuid.uuid4().hex
    _write_manifest(run_dir, {"run": run, "files": {}})
    return run


def write_sealed(run_dir: Path, name: str, write: Callable[[str], None], **facts: Any) -> None:
    """Write ``run_dir/name`` atomically and record its sha256 (and ``facts``) in the manifest. The new checksum
    is recorded as pending before the rename, so a kill between the two leaves a file the manifest accepts."""
    manifest = read_manifest(run_dir)
    entry = manifest["files"].get(name, {})

    def announce(tmp: str) -> None:
        entry["next"] = {"sha256": file_sha256(tmp), **facts}
        manifest["files"][name] = entry
        _write_manifest(run_dir, manifest)

    atomic_write(Path(run_dir) / name, write, before_rename=announce)
    manifest["files"][name] = entry.pop("next")
    _write_manifest(run_dir, manifest)


def check_sealed(run_dir: Path, name: str, manifest: dict | None = None) -> dict:
    """Check ``run_dir/name`` against the manifest; return what the manifest records about it (sha256, facts).
    A ValueError naming the file when it is missing, unrecorded or changed since the run wrote it."""
    manifest = manifest or read_manifest(run_dir)
    path = Path(run_dir) / name
    entry = manifest["files"].get(name)
    if not path.is_file():
        raise ValueError(f"{path} is missing (the run wrote it: {MANIFEST} records it)" if entry else
                         f"{path} is missing")
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not recorded in {run_dir / MANIFEST}: it was not written by this run")
    digest = file_sha256(path)
    for recorded in (entry, entry.get("next") or {}):
        if recorded.get("sha256") == digest:
            return recorded
    raise ValueError(f"{path} was changed, damaged or replaced after the run wrote it (its sha256 is not the one "
                     f"in {MANIFEST})")


def checked_log(path: Path, step: int) -> list[str]:
    """The rows of steps 1..``step`` of a metrics.jsonl (a row per step, in order). Rows past ``step`` (logged
    after the checkpoint by a killed run: they rerun) and a line torn by a kill are left out. A ValueError
    naming the file when a row up to ``step`` is missing, repeated or unreadable."""
    if not path.exists():
        if step:
            raise ValueError(f"{path} is missing: the checkpoint is at step {step}")
        return []
    try:
        lines = path.read_bytes().decode().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged (not UTF-8: {err})") from None
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if len(kept) == step:
            break
        try:
            logged = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise ValueError(f"{path} line {number} is not a metrics row ({line[:40]!r}): it was damaged") from None
        if logged != len(kept) + 1:
            raise ValueError(f"{path} line {number} logs step {logged!r} after step {len(kept)}: rows are "
                             f"{'repeated' if isinstance(logged, int) and logged <= len(kept) else 'missing'}")
        kept.append(line + "\n")
    if len(kept) < step:
        raise ValueError(f"{path} ends at step {len(kept)} but the checkpoint is at step {step}: rows were cut")
    return kept


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of steps up to ``step`` in a metrics.jsonl (:func:`checked_log`): a run killed after
    logging a step but before checkpointing it logs the step again on resume."""
    if path.exists():
        kept = checked_log(path, step)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def check_run_weights(run_dir: Path) -> dict:
    """Refuse a run folder whose weights or settings are not the ones its run wrote, or whose weights are of
    an earlier step than its checkpoint (a resumed run that has not finished); return what the manifest records
    of the weights (their step)."""
    manifest = read_manifest(run_dir)
    check_sealed(run_dir, CONFIG, manifest)
    if not (run_dir / WEIGHTS).exists():
        raise ValueError(f"no {WEIGHTS} in {run_dir}: is it a finished zo-tune run folder?")
    weights = check_sealed(run_dir, WEIGHTS, manifest)
    step = read_json(run_dir / CHECKPOINT).get("step") if (run_dir / CHECKPOINT).exists() else None
    if step is not None and step != weights.get("step"):
        raise ValueError(f"{run_dir / WEIGHTS} holds the weights of step {weights.get('step')} but the run's "
                         f"checkpoint is at step {step}: finish it with zo-tune --output-dir {run_dir} --resume")
    return weights
