"""Reliability under faults: the model cache under concurrent first use, model loading errors, checkpoints
on their own interval, SIGTERM and SIGKILL, and checkpoint integrity (issue 15)."""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from zo_objectives import models
from zo_objectives.checkpoint import resume, save_checkpoint, weights_sha256
from zo_objectives.estimators import MeZO
from zo_objectives.runfolder import CHECKPOINT, LOG
from zo_objectives.runfolder import RECORDS as RECORDS_FILE
from zo_objectives.train import train

train_mod = importlib.import_module("zo_objectives.train")  # the package exports the function train
checkpoint = importlib.import_module("zo_objectives.checkpoint")


# --- the model cache ----------------------------------------------------------------------------------------

def fake_build(folder: Path) -> None:
    """Stands in for the 30-second GGUF conversion: the cache's files, a real (tiny) safetensors file."""
    for name in models.CACHE_FILES:
        (folder / name).write_text("{}")
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")


FORK = multiprocessing.get_context("fork")  # children start at once: no second import of torch


def first_use(builds: Path, barrier, out) -> None:
    """One process's first use of the cache, with a slow stand-in conversion that logs each build."""
    def build(folder: Path) -> None:
        with open(builds, "a") as f:
            f.write("built\n")
        time.sleep(0.3)  # the other processes arrive while it converts
        fake_build(folder)

    models._build_smollm2 = build
    barrier.wait()
    out.put(str(models.smollm2_folder()))


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ZO_CACHE", str(tmp_path / "cache"))
    half = tmp_path / "cache" / "smollm2-135m-fp32"
    half.mkdir(parents=True)
    (half / "tokenizer.json").write_text("{}")  # what a crashed old version left: tokenizer files only
    barrier, out = FORK.Barrier(4), FORK.Queue()
    procs = [FORK.Process(target=first_use, args=(tmp_path / "builds", barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert {out.get(timeout=5) for _ in procs} == {str(half)}
    assert (tmp_path / "builds").read_text() == "built\n"  # one process converted, three waited for it
    assert (half / models.BUILT_MARKER).exists() and all((half / n).is_file() for n in models.CACHE_FILES)
    assert [p.name for p in half.parent.iterdir() if "tmp" in p.name] == []


def test_half_built_cache_is_rebuilt_complete_one_adopted(tmp_path, monkeypatch):
    monkeypatch.setenv("ZO_CACHE", str(tmp_path))
    builds = []
    monkeypatch.setattr(models, "_build_smollm2", lambda folder: (builds.append(folder), fake_build(folder)))
    folder = tmp_path / "smollm2-135m-fp32"
    folder.mkdir()
    for name in models.CACHE_FILES:
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00")  # a torn safetensors file
    assert not models._is_complete(folder)
    assert models.smollm2_folder() == folder and len(builds) == 1
    assert (folder / models.BUILT_MARKER).exists() and models._is_complete(folder)
    models.smollm2_folder()
    assert len(builds) == 1  # built once, then found

    (folder / models.BUILT_MARKER).unlink()  # whole, written before markers existed: adopted, not rebuilt
    assert models._is_complete(folder)
    models.smollm2_folder()
    assert len(builds) == 1 and (folder / models.BUILT_MARKER).exists()


# --- loading models -----------------------------------------------------------------------------------------

def test_dtype_applies_to_every_model():
    for dtype, expected in (("bf16", torch.bfloat16), (torch.float16, torch.float16), ("fp32", torch.float32)):
        model, _ = models.load_model("tiny-random", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {expected}
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; accepted: fp32, bf16, fp16"):
        models.load_model("tiny-random", dtype="fp8")
    with pytest.raises(ValueError, match="accepted: fp32, bf16, fp16"):
        models.resolve_dtype(torch.int8)


def test_local_folder_loads_safetensors_only(tmp_path, tokenizer):
    good = tmp_path / "good"
    models.tiny_random_model(vocab_size=len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    model, tok = models.load_model(str(good), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16 and tok.padding_side == "left"

    pickled = tmp_path / "pickled"  # weights only as a pickle: refused, never unpickled
    pickled.mkdir()
    for name in ("config.json",):
        (pickled / name).write_text((good / name).read_text())
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot load model .*pickled.*safetensors"):
        models.load_model(str(pickled))


def test_unknown_model_fails_fast_offline(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"'no-such-org/no-such-model'.*unreachable.*smollm2-135m, tiny-random"):
        models.load_model("no-such-org/no-such-model")
    with pytest.raises(ValueError, match=r"'\./missing-folder': no such folder"):
        models.load_model("./missing-folder")
    assert time.perf_counter() - t0 < 10


def test_hub_unreachable_when_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert models.hub_reachable() is False


# --- the training loop --------------------------------------------------------------------------------------

EXAMPLES = [{"x": i} for i in range(8)]


class Toy(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(16))


def toy_objective(model: Toy, batch: list[dict]) -> float:
    return float(((model.w - 0.5) ** 2).sum()) + 0.01 * sum(ex["x"] for ex in batch)


def toy_run(tmp_path: Path, steps: int, **kwargs) -> tuple[Toy, MeZO, list[dict]]:
    model = Toy()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian", seed=3)
    history = train(model, opt, toy_objective, EXAMPLES, steps=steps, batch_size=2, run_dir=tmp_path,
                    progress=False, **kwargs)
    return model, opt, history


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / LOG).read_text().splitlines()]


def test_checkpoint_on_its_own_interval(tmp_path, monkeypatch):
    saved: list[int] = []
    real = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda d, o, step, b: (saved.append(step), real(d, o, step, b)))
    toy_run(tmp_path / "every1", 4)
    assert saved == [1, 2, 3, 4]
    saved.clear()
    toy_run(tmp_path / "every3", 7, checkpoint_every=3, evaluate_fn=lambda: 0.0, eval_every=5)
    assert saved == [3, 5, 6, 7]  # its interval, the evaluation at 5, and the end
    saved.clear()
    toy_run(tmp_path / "never", 4, checkpoint_every=0)
    assert saved == [4]
    with pytest.raises(ValueError, match=r"checkpoint_every must be an int >= 0"):
        toy_run(tmp_path / "bad", 2, checkpoint_every=-1)


def test_sigterm_stops_cleanly_and_resumes_exactly(tmp_path):
    reference, _, _ = toy_run(tmp_path / "reference", 10)
    model = Toy()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian", seed=3)
    calls = []

    def objective(m: Toy, batch: list[dict]) -> float:
        calls.append(1)
        if len(calls) == 13:  # inside step 7's second evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return toy_objective(m, batch)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train(model, opt, objective, EXAMPLES, steps=10, batch_size=2, run_dir=run, checkpoint_every=4,
              progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert json.loads((run / CHECKPOINT).read_text())["step"] == 6 and logged_steps(run) == list(range(1, 7))
    resumed = Toy()
    opt, start = resume(run, list(resumed.parameters()))
    train(resumed, opt, toy_objective, EXAMPLES, steps=10, batch_size=2, start_step=start, run_dir=run,
          progress=False)
    assert torch.equal(resumed.w, reference.w) and logged_steps(run) == list(range(1, 11))


def endless_run(run: Path) -> None:
    def slow(model: Toy, batch: list[dict]) -> float:
        time.sleep(0.005)
        return toy_objective(model, batch)

    model = Toy()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian", seed=3)
    train(model, opt, slow, EXAMPLES, steps=10**6, batch_size=2, run_dir=run, checkpoint_every=7, progress=False)


@pytest.mark.parametrize("wait", [0.3, 0.77])
def test_sigkill_then_resume_keeps_metrics_consistent(tmp_path, wait):
    run = tmp_path / "run"
    proc = FORK.Process(target=endless_run, args=(run,))
    proc.start()
    deadline = time.time() + 60
    while not ((run / CHECKPOINT).exists() and len(logged_steps(run)) > 9) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(wait)
    proc.kill()  # SIGKILL: no handler runs
    proc.join()
    step = json.loads((run / CHECKPOINT).read_text())["step"]
    assert step % 7 == 0 and len(logged_steps(run)) >= step  # rows past the checkpoint, maybe a torn line
    model = Toy()
    opt, start = resume(run, list(model.parameters()))
    train(model, opt, toy_objective, EXAMPLES, steps=start + 3, batch_size=2, start_step=start, run_dir=run,
          progress=False)
    assert logged_steps(run) == list(range(1, start + 4))
    reference, _, _ = toy_run(tmp_path / "reference", start + 3)
    assert torch.equal(model.w, reference.w)


def test_truncate_log_drops_later_and_torn_rows(tmp_path):
    log = tmp_path / LOG
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    train_mod.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_train_refuses_an_optimizer_not_at_start_step(tmp_path):
    model = Toy()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian")
    with pytest.raises(ValueError, match="start_step 3 does not match the optimizer's 0 trajectory records"):
        train(model, opt, toy_objective, EXAMPLES, steps=5, start_step=3, run_dir=tmp_path, progress=False)


# --- checkpoint integrity -----------------------------------------------------------------------------------

def base_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]


def write_checkpoint(run: Path, records: list[dict], n: int = 1, params: list | None = None) -> list[torch.Tensor]:
    """Replay ``records`` onto base weights and checkpoint them as training does; return the tuned weights."""
    params = params or base_params()
    base = weights_sha256(params)
    opt = MeZO(params, lr=1e-3, noise="gaussian", n_perturbations=n)
    for record in records:
        opt.replay_record(record)
    save_checkpoint(run, opt, len(records), base)
    return [p.detach().clone() for p in params]


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@st.composite
def trajectories(draw) -> tuple[int, list[dict]]:
    n = draw(st.integers(1, 3))
    record = st.fixed_dictionaries({
        "seeds": st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n),
        "grads": st.lists(st.one_of(st.none(), finite), min_size=n, max_size=n),
        "lrs": st.lists(st.floats(0, 1e-2), min_size=1, max_size=1),
        "loss": finite,
    })
    return n, draw(st.lists(record, min_size=0, max_size=6))


def leaves(data, path=()):
    """(path, value) of every scalar in a JSON document."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from leaves(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from leaves(v, (*path, i))
    else:
        yield path, data


def changed(value):
    """A different value of a JSON scalar (a bit flipped, a number scaled, a string edited)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ 1
    if isinstance(value, float):
        return value * 1000.0 + 1.0
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    return 0.5  # None


HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(trajectory=trajectories())
def test_checkpoint_round_trip(tmp_path, trajectory):
    n, records = trajectory
    run = Path(tempfile.mkdtemp(dir=tmp_path))  # a new folder for each example
    tuned = write_checkpoint(run, records, n)
    params = base_params()
    opt, step = resume(run, params)
    assert step == len(records) and len(opt.trajectory) == step
    assert json.dumps(opt.trajectory) == json.dumps(records)
    assert all(torch.equal(a, b) for a, b in zip(params, tuned))  # bitwise the weights it was saved with


@HYPOTHESIS
@given(trajectory=trajectories(), pick=st.integers(0, 10**6), delete=st.booleans())
def test_any_single_field_corruption_is_refused(tmp_path, trajectory, pick, delete):
    n, records = trajectory
    run = Path(tempfile.mkdtemp(dir=tmp_path))
    write_checkpoint(run, records, n)
    path = run / CHECKPOINT
    saved = {"head": json.loads(path.read_text()),  # the head and each record of trajectory.jsonl
             "records": [json.loads(line) for line in (run / RECORDS_FILE).read_text().splitlines()]}
    where, value = list(leaves(saved))[pick % len(list(leaves(saved)))]
    parent = saved
    for key in where[:-1]:
        parent = parent[key]
    if delete:
        del parent[where[-1]]
    else:
        new = changed(value)
        assume(not (isinstance(new, float) and (new == value or not math.isfinite(new))))
        parent[where[-1]] = new
    path.write_text(json.dumps(saved["head"], indent=1))
    (run / RECORDS_FILE).write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in saved["records"]))
    with pytest.raises(ValueError, match=f"cannot resume: {re.escape(str(path))} "):
        resume(run, base_params())


def edit(path: Path, change, rehash: bool = False) -> None:
    """Change a saved checkpoint, seen as one document (the head with the records in its optimizer state);
    ``rehash`` recomputes its checksums (a consistent but bad checkpoint)."""
    head = json.loads(path.read_text())
    lines = (path.parent / RECORDS_FILE).read_text().splitlines(keepends=True)
    saved = {**head, "optimizer": {**head["optimizer"], "mezo": {**head["optimizer"]["mezo"],
                                                                 "trajectory": [json.loads(x) for x in lines]}}}
    change(saved)
    lines = [checkpoint.canonical(r) + "\n" for r in saved["optimizer"]["mezo"]["trajectory"]]
    if rehash:
        previous = checkpoint.chain_sha256("", lines[:-1])
        saved["records"].update(bytes=len("".join(lines).encode()), previous=previous,
                                sha256=checkpoint.chain_sha256(previous, lines[-1:]))
    del saved["optimizer"]["mezo"]["trajectory"]
    if rehash:
        body = checkpoint.canonical({k: saved[k] for k in ("step", "optimizer", "records")})
        saved["integrity"]["sha256"] = checkpoint.text_sha256(body)
    path.write_text(json.dumps(saved))
    (path.parent / RECORDS_FILE).write_text("".join(lines))


RECORDS = [{"seeds": [11 + i], "grads": [0.5 - i], "lrs": [1e-3], "loss": 1.0} for i in range(4)]


@pytest.mark.parametrize("change, rehash, message", [
    (lambda s: s.update(step=3), True, "says step 3 but holds 4 trajectory records"),
    (lambda s: s["optimizer"]["mezo"]["trajectory"][1]["grads"].__setitem__(0, -0.5 * 1000), False,
     "fails its sha256 checksum"),
    (lambda s: s["optimizer"]["mezo"]["trajectory"][2]["grads"].__setitem__(0, math.nan), True,
     "has a non-finite or malformed gradient or lr in trajectory record 2"),
    (lambda s: s["optimizer"]["mezo"]["trajectory"][0]["lrs"].__setitem__(0, math.inf), True,
     "has a non-finite or malformed gradient or lr in trajectory record 0"),
    (lambda s: s.pop("integrity"), False, "has no integrity record"),
])
def test_damaged_checkpoints_are_refused(tmp_path, change, rehash, message):
    write_checkpoint(tmp_path, RECORDS)
    edit(tmp_path / CHECKPOINT, change, rehash)
    params = base_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=f"cannot resume: {re.escape(str(tmp_path / CHECKPOINT))} {message}"):
        resume(tmp_path, params)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # refused before touching the weights


def test_other_base_weights_and_bad_json_are_refused(tmp_path):
    write_checkpoint(tmp_path, RECORDS)
    with pytest.raises(ValueError, match="was written for other base weights"):
        resume(tmp_path, base_params(seed=1))
    with pytest.raises(ValueError, match="was written for other base weights"):
        resume(tmp_path, [p.detach().to(torch.bfloat16).requires_grad_() for p in base_params()])
    (tmp_path / CHECKPOINT).write_text('{"step": 4, "optim')
    with pytest.raises(ValueError, match="is not valid JSON"):
        resume(tmp_path, base_params())


def test_replay_to_non_finite_weights_is_refused(tmp_path):
    params = [torch.full((64,), 3e38).requires_grad_()]
    write_checkpoint(tmp_path, [{"seeds": [1], "grads": [1e28], "lrs": [1e10], "loss": 0.0}], params=params)
    with pytest.raises(ValueError, match="gives non-finite weights"):
        resume(tmp_path, [torch.full((64,), 3e38).requires_grad_()])
    opt = MeZO(params, noise="gaussian")  # a record no replay survives, saved without replaying it
    opt.trajectory.append({"seeds": [1], "grads": [1e30], "lrs": [1e10], "loss": 0.0})
    save_checkpoint(tmp_path / "other", opt, 1, weights_sha256([torch.full((64,), 3e38)]))
    with pytest.raises(ValueError, match="does not replay"):  # a step beyond float32's range
        resume(tmp_path / "other", [torch.full((64,), 3e38).requires_grad_()])
