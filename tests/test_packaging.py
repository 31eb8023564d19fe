import ast
import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    return {re.split(r"[=<>!~\[]", s, maxsplit=1)[0].lower(): s for s in lines}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert conda_python == ["python=3.11"]
    assert _pins(p for p in pip if not p.startswith("-e")) == _pins(wanted)


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["test"]:
        assert "==" in dep, f"{dep} is not pinned"


def test_notebooks_are_stored_clean():
    books = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert books, "no notebooks found"
    for nb_path in books:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{nb_path.name} has outputs"
        ids = [c.get("id") for c in nb["cells"]]  # nbformat 4.5: every cell has its own id
        assert all(ids) and len(set(ids)) == len(ids), f"{nb_path.name}: a cell without an id, or a repeated one"
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: {len(tagged)} parameters cells"
        # the parameters cell holds literals only (papermill injects its values right after it)
        for stmt in ast.parse("".join(tagged[0]["source"])).body:
            assert isinstance(stmt, ast.Assign), f"{nb_path.name}: parameters cell holds more than assignments"
            ast.literal_eval(stmt.value)  # raises unless the value is a literal


def test_presets_name_existing_notebooks_and_parameters():
    params = {}
    for nb_path in (ROOT / "notebooks").glob("*.ipynb"):
        cell = next(c for c in json.loads(nb_path.read_text())["cells"]
                    if "parameters" in c.get("metadata", {}).get("tags", []))
        params[nb_path.stem] = {t.id for s in ast.parse("".join(cell["source"])).body for t in s.targets}
    for preset in (ROOT / "notebooks" / "params").glob("*.yaml"):
        data = yaml.safe_load(preset.read_text()) or {}
        shared = data.pop("shared", None) or {}  # given to every notebook that declares the name
        assert set(shared) <= set().union(*params.values()), f"{preset.name}: shared: {set(shared)}"
        assert set(data) <= set(params), preset.name
        for stem, values in data.items():  # papermill would inject a misspelt name without complaint
            assert set(values or {}) <= params[stem], f"{preset.name}: {stem}: {set(values or {}) - params[stem]}"


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make reproduce" in head and "make test" in head


def test_tests_never_write_the_committed_reports():
    import os

    assert os.environ.get("PURIFY_REPORTS_DIR") and Path(os.environ["PURIFY_REPORTS_DIR"]) != ROOT / "reports"
