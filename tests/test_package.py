"""The package as a user imports it: what ``import zo_objectives`` loads, its public names, and a loud error when
a ``metrics.py`` or ``tasks.py`` in the working directory would shadow the top-level packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zo_objectives

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["accelerate", "pandas", "pyarrow", "scipy", "sklearn"]  # not needed for an optimizer step


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` (first on sys.path, as for a user's script), importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_does_not_load_what_an_optimizer_step_does_not_need(tmp_path):
    code = f"""
import json, sys
import metrics, tasks, zo_objectives
from zo_objectives import MeZO, make_objective, predictor_for, train
loaded = [m for m in {HEAVY!r} if m in sys.modules]
zo_objectives.load_model  # first use imports the model code
print(json.dumps({{"loaded": loaded, "models": "zo_objectives.models" in sys.modules}}))
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"loaded": [], "models": True}


def test_public_names_resolve():
    for name in zo_objectives.__all__:
        assert getattr(zo_objectives, name) is not None, name
    assert set(zo_objectives.__all__) <= set(dir(zo_objectives))
    assert zo_objectives.load_model.__module__ == "zo_objectives.models"
    assert callable(zo_objectives.train)  # the function, not the module of the same name
    with pytest.raises(AttributeError, match="has no attribute 'LabelWords'"):
        zo_objectives.LabelWords  # noqa: B018


@pytest.mark.parametrize("name", ["metrics", "tasks"])
def test_a_local_file_shadowing_a_top_level_package_is_a_clear_import_error(tmp_path, name):
    shadow = tmp_path / f"{name}.py"
    shadow.write_text("# the user's own module\n")
    result = run_python("import zo_objectives", tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"ImportError: {shadow} shadows zo-objectives' {name!r} package ({ROOT / name}); rename it, or "
                    f"run from a folder without a {name}.py")
