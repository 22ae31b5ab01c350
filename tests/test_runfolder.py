"""The run folder as one unit (issue 24): the manifest ties settings, checkpoint and weights together, one run
holds a folder at a time, --overwrite removes the previous run's files, stops and disk errors print one line."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from zo_objectives import cli, runfolder
from zo_objectives.checkpoint import replay, resume, save_checkpoint, weights_sha256
from zo_objectives.cli import eval_main, tune_main
from zo_objectives.estimators import MeZO
from zo_objectives.runfolder import CHECKPOINT, CONFIG, EVAL, LOCK, LOG, RECORDS, WEIGHTS
from zo_objectives.train import train

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")]

BASE = ["--model", "tiny-random", "--task", "sst2", "--train-size", "32", "--batch-size", "8", "--no-progress",
        "--eval-size", "8", "--eval-every", "0", "--no-eval-before"]


def tune(run: Path, *args: str) -> int:
    return tune_main([*BASE, "--output-dir", str(run), *args])


def one_line(capsys, alone: bool = True) -> str:
    """The error line, checked to be the only line printed (``alone``: else the last, after a run's own lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and (len(err.strip().splitlines()) == 1 or not alone), err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped at step 2 (resumable to 4) and a finished 4-step run with other seed, made once."""
    root = tmp_path_factory.mktemp("runs")
    assert tune(root / "stopped", "--steps", "2") == 0
    assert tune(root / "other", "--steps", "4", "--seed", "1") == 0
    return root


@pytest.fixture
def stopped(runs, tmp_path):
    shutil.copytree(runs / "stopped", tmp_path / "stopped")
    return tmp_path / "stopped"


def resume_to_4(run: Path) -> int:
    return tune_main(["--output-dir", str(run), "--resume", "--steps", "4"])


# --- the five severe cases -----------------------------------------------------------------------------------

def test_edited_config_is_refused_on_resume(stopped, capsys):
    config = json.loads((stopped / CONFIG).read_text())
    (stopped / CONFIG).write_text(json.dumps({**config, "seed": 1}, indent=1))
    assert resume_to_4(stopped) == 2
    line = one_line(capsys)
    assert f"{stopped / CONFIG} was changed" in line
    assert json.loads((stopped / CHECKPOINT).read_text())["step"] == 2  # nothing written


def test_foreign_trajectory_is_refused_on_resume(stopped, runs, capsys):
    for name in (CHECKPOINT, RECORDS):  # another run's checkpoint, same model, other seed
        shutil.copy(runs / "other" / name, stopped / name)
    rows = (stopped / LOG).read_text()
    assert resume_to_4(stopped) == 2
    assert f"{stopped / CHECKPOINT} belongs to another run" in one_line(capsys)
    assert (stopped / LOG).read_text() == rows


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_are_refused_by_eval(runs, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "other", run)
    data = bytearray((run / WEIGHTS).read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40  # a bit of the last tensor's last value
    else:
        data = data[: len(data) // 2]
    (run / WEIGHTS).write_bytes(bytes(data))
    assert eval_main(["--run", str(run), "--eval-size", "4"]) == 2
    assert f"{run / WEIGHTS} was changed, damaged or replaced" in one_line(capsys)


def test_overwrite_removes_the_previous_runs_files_first(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "other", run)
    (run / "notes.txt").write_text("mine")  # not a file a run writes: kept

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", stop)  # the new run is stopped before its first step
    assert tune(run, "--steps", "3", "--overwrite") == 130
    assert "stopped by SIGINT before the first checkpoint" in one_line(capsys, alone=False)
    assert sorted(p.name for p in run.iterdir()) == sorted([CONFIG, EVAL, LOCK, "manifest.json", "notes.txt"])
    assert eval_main(["--run", str(run)]) == 2  # no old weights evaluated beside the new settings
    assert f"no {WEIGHTS} in {run}" in one_line(capsys)


def test_a_locked_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with FileLock(run / LOCK, timeout=0):  # another process's run holds it
        assert tune(run, "--steps", "1") == 2
        assert f"run folder {run} is in use by another run" in one_line(capsys)
    assert [p.name for p in run.iterdir()] == [LOCK]
    assert tune(run, "--steps", "1") == 0  # once released, the folder is free


def test_a_second_run_on_one_folder_is_refused(tmp_path, capsys):
    """Two zo-tune processes on one new folder: one runs, the other is refused (lock, or the folder it finds)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zo_objectives.cli", *BASE, "--output-dir", str(run), "--steps", "30"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "in use by another run" in results[1][1] or "exists; pass --resume" in results[1][1]
    assert len(results[1][1].strip().splitlines()) == 1
    assert [json.loads(x)["step"] for x in (run / LOG).read_text().splitlines()] == list(range(1, 31))


# --- resume --------------------------------------------------------------------------------------------------

def test_resume_below_the_checkpoint_is_refused(stopped, capsys):
    assert tune_main(["--output-dir", str(stopped), "--resume", "--steps", "1"]) == 2
    assert "--steps 1 is below the step of the checkpoint" in one_line(capsys)


def test_resume_with_another_model_is_refused_before_loading_it(stopped, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert tune_main(["--output-dir", str(stopped), "--resume", "--steps", "4", "--model", "smollm2-135m"]) == 2
    assert "--model tiny-random -> smollm2-135m: cannot change" in one_line(capsys)


def test_a_folder_left_before_the_first_checkpoint_is_reused(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def fail(*args, **kwargs):
        raise RuntimeError("a crash before the first step")

    with monkeypatch.context() as m:
        m.setattr(cli, "train", fail)
        with pytest.raises(RuntimeError):
            tune(run, "--steps", "2")
    assert (run / CONFIG).exists() and not (run / CHECKPOINT).exists()
    capsys.readouterr()
    assert tune(run, "--steps", "2") == 0
    assert f"reusing {run}" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda log: log.write_text("".join(log.read_text().splitlines(keepends=True)[:1])), "ends at step 1"),
    (lambda log: log.unlink(), "is missing"),
    (lambda log: log.write_text('{"step": 1}\n{"st\n'), "line 2 is not a metrics row"),
    (lambda log: log.write_text('{"step": 1}\n{"step": 1}\n{"step": 2}\n'), "rows are repeated"),
    (lambda log: log.write_bytes(b'{"step": 1}\n\xff\xfe\n'), "not UTF-8"),
])
def test_damaged_metrics_are_refused_on_resume(stopped, damage, message, capsys):
    damage(stopped / LOG)
    assert resume_to_4(stopped) == 2
    line = one_line(capsys)
    assert str(stopped / LOG) in line and message in line


@pytest.mark.parametrize("name", [CHECKPOINT, EVAL])
@pytest.mark.parametrize("damage", ["truncate", "latin1"])
def test_damaged_json_is_refused_naming_the_file(stopped, name, damage, capsys):
    path = stopped / name
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2] if damage == "truncate" else text.replace(b'"', b'\xe9"', 1))
    assert resume_to_4(stopped) == 2
    assert str(path) in one_line(capsys)


def test_stale_temporaries_are_removed_and_files_get_the_usual_mode(stopped, capsys):
    for name in (f".{CHECKPOINT}.abc123", f".{CONFIG}.def456"):
        (stopped / name).write_text("half written")
    (stopped / RECORDS).open("a").write('{"seeds": [1], "gr')  # a record appended by a run killed before its head
    assert resume_to_4(stopped) == 0
    names = {p.name for p in stopped.iterdir()}
    assert not {n for n in names if n.startswith(".") and n != LOCK}
    mask = os.umask(0)
    os.umask(mask)
    for name in names - {LOCK}:
        assert (stopped / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_eval_refuses_weights_of_an_earlier_step(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "other", run)
    with monkeypatch.context() as m:  # a resume to step 6 stopped after its last checkpoint, before its weights
        m.setattr(cli, "evaluate_metrics", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        assert tune_main(["--output-dir", str(run), "--resume", "--steps", "6"]) == 130
    capsys.readouterr()
    assert eval_main(["--run", str(run)]) == 2
    assert f"{run / WEIGHTS} holds the weights of step 4 but the run's checkpoint is at step 6" in one_line(capsys)


# --- stops and errors print one line -------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_one_line_and_the_conventional_status(tmp_path, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zo_objectives.cli", *BASE, "--output-dir", str(run), "--steps", "100000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    # the default handlers: a test runner or a shell may have left SIGINT ignored, which a child inherits
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (run / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signum)
        code, err = proc.wait(60), proc.stderr.read()
    finally:
        proc.kill()
    assert code == 128 + signum
    last = err.strip().splitlines()[-1]
    step = json.loads((run / CHECKPOINT).read_text())["step"]
    assert "Traceback" not in err and last == (
        f"zo-tune: stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {run / CHECKPOINT}; "
        f"continue with: zo-tune --output-dir {run} --resume")
    assert tune_main(["--output-dir", str(run), "--resume", "--steps", str(step + 1)]) == 0


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EROFS, "Read-only file system")])
def test_a_full_disk_or_read_only_folder_prints_one_line_and_keeps_the_checkpoint(stopped, monkeypatch, capsys,
                                                                                   err):
    real = runfolder.atomic_write

    def failing(path, *args, **kwargs):
        if path.name == CHECKPOINT:
            err.filename = str(path)
            raise err
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runfolder, "atomic_write", failing)
    assert resume_to_4(stopped) == 1
    line = one_line(capsys, alone=False)
    assert f"cannot write {stopped / CHECKPOINT}: {err.strerror}" in line
    monkeypatch.undo()
    assert json.loads((stopped / CHECKPOINT).read_text())["step"] == 2
    assert resume_to_4(stopped) == 0


def test_a_plugin_that_raises_at_import_prints_one_line(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    assert tune(tmp_path / "run", "--plugin", str(tmp_path / "broken.py")) == 2
    assert "cannot import --plugin" in (line := one_line(capsys)) and "ZeroDivisionError" in line


@pytest.mark.parametrize("template, needle", [
    ("It was", "uses no column"),
    ("{text.upper} It was", "not {text.upper}"),
    ("{text!z} It was", "unknown conversion !z"),
    ("{text}} It was", "Single '}'"),
])
def test_template_mistakes_name_the_flag(tmp_path, template, needle, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(8)))
    assert tune(tmp_path / "run", "--data", str(data), "--template", template, "--label-words", " bad", " good") == 2
    line = one_line(capsys)
    assert f"--template {template!r}" in line and needle in line
    assert not (tmp_path / "run").exists()


# --- the library: train(), save_checkpoint(), replay() ------------------------------------------------------

EXAMPLES = [{"x": i} for i in range(8)]


def objective(model: torch.nn.Module, batch: list[dict]) -> float:
    return float(((model.weight - 0.5) ** 2).sum()) + 0.01 * sum(ex["x"] for ex in batch)


def linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3, bias=False)


def test_train_called_twice_continues(tmp_path):
    model = linear()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian", seed=3)
    first = train(model, opt, objective, EXAMPLES, steps=3, batch_size=2, progress=False)
    second = train(model, opt, objective, EXAMPLES, steps=6, batch_size=2, progress=False)
    assert [r["step"] for r in first + second] == [1, 2, 3, 4, 5, 6]
    straight = linear()
    train(straight, MeZO(straight.parameters(), lr=1e-2, noise="gaussian", seed=3), objective, EXAMPLES, steps=6,
          batch_size=2, progress=False)
    assert torch.equal(model.weight, straight.weight)
    with pytest.raises(ValueError, match="steps 2 is below start_step 6"):
        train(model, opt, objective, EXAMPLES, steps=2, progress=False)


def test_a_fresh_optimizer_over_a_run_folder_is_refused(tmp_path):
    model = linear()
    train(model, MeZO(model.parameters(), lr=1e-2, noise="gaussian"), objective, EXAMPLES, steps=4, batch_size=2,
          run_dir=tmp_path, progress=False)
    rows = (tmp_path / LOG).read_text()
    fresh = linear()
    with pytest.raises(ValueError, match="holds a run at step 4"):
        train(fresh, MeZO(fresh.parameters(), lr=1e-2, noise="gaussian"), objective, EXAMPLES, steps=4,
              batch_size=2, run_dir=tmp_path, progress=False)
    assert (tmp_path / LOG).read_text() == rows
    other = linear(1)  # another optimizer at the checkpoint's step: not this run's trajectory
    opt = MeZO(other.parameters(), lr=1e-2, noise="gaussian", seed=9)
    train(other, opt, objective, EXAMPLES, steps=4, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="the optimizer's trajectory is not the one in"):
        train(other, opt, objective, EXAMPLES, steps=5, batch_size=2, run_dir=tmp_path, progress=False)


def test_checkpoints_append_and_a_torn_append_is_harmless(tmp_path):
    model = linear()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian")
    train(model, opt, objective, EXAMPLES, steps=3, batch_size=2, run_dir=tmp_path, progress=False)
    before = (tmp_path / RECORDS).read_bytes()
    with open(tmp_path / RECORDS, "ab") as f:
        f.write(b'{"seeds": [7], "grads"')  # a kill while appending step 4: the head still says 3
    resumed = linear()
    opt2, start = resume(tmp_path, list(resumed.parameters()))
    assert start == 3 and torch.equal(resumed.weight, model.weight)
    train(resumed, opt2, objective, EXAMPLES, steps=5, batch_size=2, run_dir=tmp_path, progress=False)
    after = (tmp_path / RECORDS).read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 5  # appended past the last checkpoint's bytes
    with pytest.raises(ValueError, match="is of another run or a later step"):
        save_checkpoint(tmp_path, MeZO(linear(2).parameters(), noise="gaussian"), 0, "")


@pytest.mark.parametrize("params, message", [
    (lambda m: [m.weight, torch.nn.Parameter(torch.zeros(2))], "the state is of 1 parameters, got 2"),
    (lambda m: [torch.nn.Parameter(m.weight.detach().double())], "parameter 0 is float64 (3, 4)"),
    (lambda m: list(torch.nn.Linear(3, 4, bias=False).parameters()), "parameter 0 is float32 (4, 3)"),
    (lambda m: list(linear(5).parameters()), "do not hold the base weights"),
])
def test_replay_checks_the_parameters_it_is_given(params, message):
    model = linear()
    base = weights_sha256(model.parameters())
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian")
    train(model, opt, objective, EXAMPLES, steps=2, batch_size=2, progress=False)
    state = opt.state_dict()
    state["mezo"]["base_sha256"] = base
    given = params(linear())
    before = [p.detach().clone() for p in given]
    with pytest.raises(ValueError, match=re.escape(message)):
        replay(given, state)
    assert all(torch.equal(a, b) for a, b in zip(given, before))
    again = linear()
    replay(list(again.parameters()), state)
    assert torch.equal(again.weight, model.weight)
