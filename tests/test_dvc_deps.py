"""dvc.yaml lists, for each stage, exactly the code the stage runs: a library change re-runs the stages that use it
and no others. (stages/_tracking.py only logs to MLflow and stages/_cli.py only words the error lines; changing them
does not change any output, so they are not deps.)"""
import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# tracking, the model registry and the one-line error wrapper cannot change an output; the paths module names files
# dvc.yaml's deps and outs name too, so a changed path changes the stage's definition there
# (test_paths_module_names_dvc_yaml_outputs)
NOT_DEPS = {"stages/_tracking.py", "stages/_registry.py", "stages/_cli.py", "stages/_paths.py"}


def module_file(module: str) -> Path | None:
    parts = module.split(".")
    base = ROOT / "src" if parts[0] == "vqprior" else ROOT
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Project files that `path` imports (at any depth of the file, since lazy imports run too)."""
    package = ".".join(path.relative_to(ROOT / "src" if "src" in path.parts else ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]  # `from . import x` may be a module
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("vqprior", "stages") and (file := module_file(name)):
                found.add(file)
    return found


def closure(start: Path) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported_files(path))
        # importing a.b.c runs the packages' __init__ files on the way
        for parent in path.parents:
            if parent in (ROOT, ROOT / "src"):
                break
            if (init := parent / "__init__.py").exists() and init != path:
                todo.append(init)
    names = {str(p.relative_to(ROOT)) for p in seen}
    # an __init__ of only a docstring and constants (a version) cannot change a result
    return {n for n in names if n not in NOT_DEPS and not (n.endswith("__init__.py") and only_constants(ROOT / n))}


def only_constants(path: Path) -> bool:
    return all(isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant)
               for node in ast.parse(path.read_text()).body)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_the_imported_files(stage):
    code = closure(ROOT / f"stages/{stage}.py")
    deps = [d for d in STAGES[stage]["deps"] if d.startswith(("src/", "stages/"))]
    covered = {c for c in code if any(c == d or c.startswith(d.rstrip("/") + "/") for d in deps)}
    assert covered == code, f"dvc.yaml stage {stage} is missing deps: {sorted(code - covered)}"
    listed = set()  # every code file the deps name, a folder dep standing for each .py file under it
    for d in deps:
        folder = ROOT / d
        listed |= {str(f.relative_to(ROOT)) for f in folder.rglob("*.py")} if folder.is_dir() else {d}
    unused = sorted(f for f in listed - code if not (f.endswith("__init__.py") and only_constants(ROOT / f)))
    assert not unused, f"dvc.yaml stage {stage} lists deps it does not import: {unused}"


def _entries(stage: dict, field: str) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in stage.get(field, [])}


def test_paths_module_names_dvc_yaml_outputs():
    """Each path of stages/_paths.py is an output of the stage dvc.yaml says writes it: the two cannot drift apart."""
    from stages import _paths as paths

    for stage, report in paths.REPORTS.items():
        assert str(report.detail) in _entries(STAGES[stage], "outs"), (stage, report.detail)
        # the files DVC reads as metrics are exactly the headline files: nothing else widens `dvc metrics show`
        assert _entries(STAGES[stage], "metrics") == ({str(report.metrics)} if report.metrics else set()), stage
    writers = {paths.PREPARED: "prepare", paths.REFERENCE: "reference", paths.CODES: "extract_codes", paths.SAMPLES: "sample",
               paths.VQVAE: "train_vqvae", paths.PRIOR: "train_prior", paths.CLASSIFIER: "train_classifier"}
    for path, stage in writers.items():
        assert str(path) in _entries(STAGES[stage], "outs"), (stage, path)
    assert any(str(paths.SWEEP_POINTS) in o for s in STAGES.values() for o in _entries(s, "outs"))
