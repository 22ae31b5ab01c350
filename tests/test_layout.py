"""The package's layout: imports go one way, no private name crosses a module, estimators are peers in a registry
(a new one is one file, here a test file), and the move into ``zo_objectives.estimators`` changed no weight."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from layout_scenarios import GOLDEN, SCENARIOS
from layout_scenarios import run as run_scenario
from safetensors.torch import load_file

import zo_objectives
from zo_objectives import estimators
from zo_objectives.checkpoint import replay, resume
from zo_objectives.cli import tune_main
from zo_objectives.estimators import Estimator, estimator_from_state, get_estimator, register_estimator
from zo_objectives.estimators.hooks import Perturbed
from zo_objectives.runfolder import WEIGHTS
from zo_objectives.train import train

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "zo_objectives"
OLD_RUNS = Path(__file__).parent / "data" / "pre_estimators"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, at any depth (functions, TYPE_CHECKING blocks included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def test_no_import_cycle_among_the_package_modules():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in imports(path):
            for target in [f"{module}.{n}" for n in names] + [module]:
                if target in modules and target != name:
                    edges.add(target)
                    break  # "from zo_objectives import fused" is the module fused, not the package
        graph[name] = edges
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert "zo_objectives.estimators.mezo" in graph and graph["zo_objectives.train"], graph  # the walk saw the tree


def test_no_private_name_is_imported_across_modules():
    ours = ("zo_objectives", "metrics", "tasks")
    crossings = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("runs", "build") for part in path.relative_to(ROOT).parts):
            continue
        for module, names in imports(path):
            if module.split(".")[0] in ours:
                crossings += [f"{path.relative_to(ROOT)}: from {module} import {n}" for n in names
                              if n.startswith("_") and not n.startswith("__")]
    assert not crossings, crossings


def test_the_registry_lists_the_estimators_by_name():
    assert {"mezo", "population"} <= set(estimators.list_estimators())
    assert get_estimator("mezo") is zo_objectives.MeZO and get_estimator("population") is zo_objectives.Population
    with pytest.raises(ValueError, match="unknown estimator 'nope'; accepted: .*mezo"):
        get_estimator("nope")
    # states written before estimators carried their name are found by their settings
    assert estimator_from_state({"mezo": {"population": 4}}) is zo_objectives.Population
    assert estimator_from_state({"mezo": {"eps": 1e-3}}) is zo_objectives.MeZO


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_weights_are_bitwise_those_of_the_code_before_the_move(name):
    assert run_scenario(name) == json.loads(GOLDEN.read_text())[name]


# --- a new estimator in a test file: registered, trained, resumed and replayed without touching the package ---

@register_estimator("toy-forward")
class ToyForward(Estimator):
    """One-sided SPSA: the loss at x and at x + eps z, g = (plus - base) / eps. Twenty lines on the shared core."""

    def step(self, closure):
        (seed,) = self.next_seeds(1)
        with self.in_step(), torch.no_grad():
            base = float(closure())
            with Perturbed(self, seed, 1.0):
                plus = float(closure())
        return self.commit([seed], [(plus - base) / self.eps], (base + plus) / 2)


def toy_objective(model: torch.nn.Module, batch: list[dict]) -> float:
    ids = torch.tensor([[b["i"] % 60 + 1 for b in batch]])
    logits = model(input_ids=ids).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def test_a_toy_estimator_trains_resumes_and_replays_bitwise(tmp_path):
    from layout_scenarios import model

    data = [{"i": i} for i in range(16)]

    def fresh():
        m = model()
        return m, [p for p in m.parameters() if p.requires_grad]

    m, params = fresh()
    whole = ToyForward(params, lr=1e-2, eps=1e-3, seed=3)
    train(m, whole, toy_objective, data, steps=6, batch_size=4, progress=False)
    moved = [p.detach().clone() for p in params]

    m2, params2 = fresh()
    assert not all(torch.equal(a, b) for a, b in zip(moved, params2))  # the toy did move the weights
    first = ToyForward(params2, lr=1e-2, eps=1e-3, seed=3)
    train(m2, first, toy_objective, data, steps=3, batch_size=4, run_dir=tmp_path / "run", progress=False)
    m3, params3 = fresh()
    resumed, start = resume(tmp_path / "run", params3)
    assert type(resumed) is ToyForward and start == 3
    assert resumed.state_dict()["mezo"]["estimator"] == "toy-forward"
    train(m3, resumed, toy_objective, data, steps=6, batch_size=4, run_dir=tmp_path / "run", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(moved, params3))

    m4, params4 = fresh()
    assert type(replay(params4, whole.state_dict())) is ToyForward
    assert all(torch.equal(a, b) for a, b in zip(moved, params4))


BASE = ["--model", "tiny-random", "--task", "sst2", "--train-size", "32", "--batch-size", "4", "--no-progress",
        "--eval-size", "8", "--eval-every", "0", "--no-eval-before"]


def test_the_cli_takes_an_estimator_by_name_from_a_plugin(tmp_path, capsys):
    plugin = Path(__file__).resolve()  # this file registers toy-forward
    run = tmp_path / "toy"
    assert tune_main([*BASE, "--plugin", str(plugin), "--estimator", "toy-forward", "--steps", "2",
                      "--output-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["estimator"] == "toy-forward"
    assert tune_main([*BASE, "--estimator", "nope", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--estimator: unknown estimator 'nope'; accepted:" in capsys.readouterr().err


@pytest.mark.parametrize("kind, flags", [("mezo", []), ("pop", ["--population", "4"])])
def test_a_run_folder_written_before_the_move_resumes_bitwise(tmp_path, kind, flags):
    """Folders written by the code before estimators moved (stopped at step 2; weights file left out: resume
    rebuilds them) continue to step 4 with the same weights as a run of 4 steps today."""
    old = tmp_path / "old"
    shutil.copytree(OLD_RUNS / f"run_{kind}", old)
    assert tune_main(["--output-dir", str(old), "--resume", "--steps", "4", "--no-progress"]) == 0
    new = tmp_path / "new"
    assert tune_main([*BASE, *flags, "--steps", "4", "--output-dir", str(new)]) == 0
    before, after = load_file(old / WEIGHTS), load_file(new / WEIGHTS)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
