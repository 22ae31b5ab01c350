"""README, docs/ and BENCHMARKS.md agree with the stored results (benchmarks/results/*.json); their links resolve."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]?\d+)?(?![\w.]*\d)")


def load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert match, f"no {name} section"
    return match.group(1)


def test_readme_results_table_is_generated_from_the_results():
    summary = load("summary")
    assert block((ROOT / "README.md").read_text(), "results") == summary.table(), (
        "README's results table differs from benchmarks/results: run python benchmarks/summary.py --write")


def test_readme_results_cells_come_from_their_result_rows():
    summary = load("summary")
    results = load("_common").load_results()
    readme = block((ROOT / "README.md").read_text(), "results")
    for what, _, cells in summary.ROWS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| {what} |") and all(
            summary.cell(results, *spec) in line for spec in cells))
        assert row
    with pytest.raises(ValueError, match="2 rows match"):  # an ambiguous pick is an error, not the first row
        summary.cell(results, "objective_gap_sst2", {"update": "sgd", "lr": "1e-05", "tied steps (seed 0)": "0%"},
                     "seed 0")


def test_readme_seed_table_is_generated_from_the_result():
    seed_table, results = load("seed_table"), load("_common").load_results()
    assert block((ROOT / "README.md").read_text(), "seed_table") == seed_table.readme_glance(results["seed_table"]), (
        "README's seed comparison differs from benchmarks/results: run python benchmarks/seed_table.py --table --write")


def test_benchmarks_md_sections_are_rendered_from_the_results():
    common = load("_common")
    text = (ROOT / "BENCHMARKS.md").read_text()
    results = common.load_results()
    assert block(text, "environments") == common.environments_table(results)
    for name, result in results.items():
        if "seed" in result["params"]:  # one seed of objective_gap.py: part of its task's seeds table
            assert f"<!-- {name}:begin -->" not in text
            continue
        assert block(text, name) == common.render(result).strip(), f"BENCHMARKS.md section {name} is out of date"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_decimal_number_in_docs_is_a_stored_result(page):
    stored = "\n".join(p.read_text() for p in (ROOT / "benchmarks" / "results").rglob("*.json"))
    known = {n.lstrip("+-") for n in NUMBER.findall(stored)}
    missing = [n for n in NUMBER.findall(page.read_text()) if n.lstrip("+-") not in known]
    assert not missing, f"{page.name}: numbers not found in benchmarks/results: {missing}"


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS],
                         ids=["README.md", "BENCHMARKS.md", *(p.name for p in DOCS)])
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            anchors = {load("summary").anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
            assert anchor in anchors, f"{page.name}: no heading for #{anchor} in {file.name}"


def test_readme_quickstart_runs_on_tiny_random():
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert 'load_model("tiny-random")' in code
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = re.findall(r"^(?:before|after) (\d\.\d+)$", out.stdout, re.M)
    assert 0 <= float(before) <= 1 and 0 <= float(after) <= 1
