"""The package's layers, from its imports: entry points import no other entry point, and data/ and models/
import nothing from the orchestration above them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "twincar"
ENTRY_POINTS = {"twincar.train", "twincar.eval", "twincar.predict", "twincar.explain", "twincar.export",
                "twincar.demo", "twincar.compare", "twincar.report", "twincar.ablation",
                "twincar.calibrate", "twincar.index"}
ORCHESTRATION = ENTRY_POINTS | {"twincar.inference.predictor", "twincar.gradcam.explainer",
"twincar.evaluation.figures", "twincar.runs",
                                "twincar.training", "twincar.evaluation.calibration",
                                "twincar.evaluation.neighbours", "twincar.inference.parallel",
                                "twincar.inference.shards"}
# twincar.models.metrics sits between data and models: the classifier logs with it, and it reads only class names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every twincar module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("twincar")}


def within(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_graph_sees_the_package():
    assert {"twincar.train", "twincar.data.datamodule", "twincar.models.loading", "twincar.inference.predictor"} \
        <= set(GRAPH)
    assert "twincar.inference.predictor" in GRAPH["twincar.predict"]


def test_no_entry_point_imports_another():
    crossing = {m: sorted(i for i in deps if within(i, ENTRY_POINTS - {m})) for m, deps in GRAPH.items()
                if m in ENTRY_POINTS}
    assert {m: d for m, d in crossing.items() if d} == {}


def test_data_and_models_import_no_orchestration():
    upward = {m: sorted(i for i in deps if within(i, ORCHESTRATION)) for m, deps in GRAPH.items()
              if within(m, {"twincar.data", "twincar.models"})}
    assert {m: d for m, d in upward.items() if d} == {}


def test_data_imports_nothing_from_models_or_metrics():
    above = {"twincar.models", "twincar.models.metrics"}
    upward = {m: sorted(i for i in deps if within(i, above))
              for m, deps in GRAPH.items() if within(m, {"twincar.data"})}
    assert {m: d for m, d in upward.items() if d} == {}
    assert {i for i in GRAPH["twincar.models.metrics"] if not within(i, {"twincar.data", "twincar.errors"})} == set()


def test_the_low_level_imports_only_the_low_level():
    low = {"twincar.errors", "twincar.files", "twincar.compat"}
    upward = {m: sorted(i for i in deps if not within(i, low)) for m, deps in GRAPH.items() if within(m, low)}
    assert {m: d for m, d in upward.items() if d} == {}


def test_private_internals_of_other_libraries_live_in_compat():
    """``_name`` attributes of lightning, torch and pytorch_grad_cam are touched only in twincar/compat/."""
    libraries = {"torch", "lightning", "pytorch_grad_cam", "L"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "compat" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in libraries:
                    offenders.append(f"{module_name(path)}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in libraries:
                offenders += [f"{module_name(path)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []
