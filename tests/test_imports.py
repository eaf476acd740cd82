"""Imports point one way along the pipeline (docs/architecture.md):

    config, args, errors → run → data → sae (and kernels) → training → evals → experiments → cli (and export)

A module imports only from its own stage or the stages to its left, at module level and
inside functions alike; the check parses every file of the package."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["esosae.config esosae.args esosae.errors", "esosae.run", "esosae.data", "esosae.sae esosae.kernels",
          "esosae.training", "esosae.evals", "esosae.experiments", "esosae.cli esosae.report esosae.export"]


def stage(module: str) -> int:
    for i, names in enumerate(STAGES):
        if any(module == n or module.startswith(n + ".") for n in names.split()):
            return i
    raise AssertionError(f"{module} belongs to no stage; add it to STAGES and docs/architecture.md")


def modules():
    for path in sorted((ROOT / "esosae").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "esosae.kernels" + ("" if path.stem == "__init__" else f".{path.stem}"), path


def imported(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("esosae"):
            if node.module == "esosae":
                yield from (f"esosae.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("esosae"))


def test_imports_point_one_way():
    wrong = [f"{name} ({STAGES[stage(name)].split()[0]}) imports {dep} ({STAGES[stage(dep)].split()[0]})"
             for name, path in modules() for dep in imported(path) if stage(dep) > stage(name)]
    assert not wrong, "\n".join(wrong)


def test_kernels_import_only_torch_triton_and_nvtx():
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top in ("torch", "triton", "nvtx", "__future__", "contextlib", "math", "dataclasses",
                               "typing") or name.startswith("esosae.kernels"), f"{path.name} imports {name}"


def test_the_trainer_does_not_import_the_evaluations():
    code = ("import sys, esosae.training.loop, esosae.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('esosae.evals', 'esosae.experiments'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_bare_name_kernels_means_the_hub_distribution(tmp_path):
    """transformers >= 5.25 imports Hugging Face's ``kernels``; run from the repository root, the
    repository's kernels/ folder must not answer to that name (esosae/__init__.py's finder)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUB = True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    code = "import esosae, kernels, esosae.kernels as ours; print(kernels.HUB, ours.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", str(ROOT / "kernels" / "__init__.py")]
