"""The package's layers, from its imports: every import of every module (at the top, inside a function, under
``TYPE_CHECKING``) is checked against a whitelist of what each layer may import, and no import cycle of any length
exists among the modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "twincar"

TOOLS = {"twincar.train", "twincar.eval", "twincar.predict", "twincar.explain", "twincar.export", "twincar.demo",
         "twincar.compare", "twincar.report", "twincar.ablation", "twincar.calibrate", "twincar.index",
         "twincar.check", "twincar.cache", "twincar.classes", "twincar.synthetic", "twincar.serve"}
FOUNDATION = {"twincar.errors", "twincar.files", "twincar.runs", "twincar.cluster", "twincar.compat"}
# What each layer may import, besides itself. The tools (command-line entry points) may import any library layer,
# and no other tool. ``twincar`` (the package's __init__) is the facade: ``from twincar import Predictor``.
LAYERS = {
    "foundation": (FOUNDATION, set()),
    "twincar.conf": ({"twincar.conf"}, FOUNDATION),
    "twincar.data": ({"twincar.data"}, FOUNDATION),
    "twincar.models": ({"twincar.models"}, FOUNDATION | {"twincar.data"}),
    "twincar.inference": ({"twincar.inference"}, FOUNDATION | {"twincar.data", "twincar.models"}),
    "twincar.evaluation": ({"twincar.evaluation"}, FOUNDATION | {"twincar.data", "twincar.models",
                                                                 "twincar.inference"}),
    "twincar.gradcam": ({"twincar.gradcam"}, FOUNDATION | {"twincar.data", "twincar.models", "twincar.inference"}),
    "twincar.training": ({"twincar.training"}, FOUNDATION | {"twincar.data", "twincar.models", "twincar.inference",
                                                             "twincar.evaluation"}),
}
LIBRARY = set().union(*(members for members, _ in LAYERS.values()))
FACADE = {"twincar": {"twincar.inference"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(module: str, name: str | None = None) -> str:
    """The twincar module an import names: ``from twincar.data import images`` is ``twincar.data.images``."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def imports(path: Path) -> set[str]:
    """Every twincar module ``path`` imports, anywhere in the file, relative imports resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("twincar")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("twincar"):
                found |= {resolve(module, a.name) for a in node.names}
    return found - {here}


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def within(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layer(module: str) -> str | None:
    for name, (members, _) in LAYERS.items():
        if within(module, members):
            return name
    return None


def test_the_graph_sees_the_package_and_its_imports_inside_functions():
    assert {"twincar.train", "twincar.data.datamodule", "twincar.inference.predictor", "twincar.cluster"} <= set(GRAPH)
    assert "twincar.inference.predictor" in GRAPH["twincar"]  # imported inside __getattr__
    assert "twincar.data.images" in GRAPH["twincar.data.datasets"]


def test_every_module_belongs_to_one_layer_or_is_a_tool():
    assert sorted(m for m in GRAPH if m not in TOOLS and m not in FACADE and layer(m) is None) == []


def test_the_top_level_holds_tools_and_at_most_six_other_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    others = sorted(f"twincar.{m}" for m in top if f"twincar.{m}" not in TOOLS and m != "__init__"
                    and m not in {"data", "models", "inference", "evaluation", "training", "gradcam", "conf"})
    assert len(others) <= 6, others


def test_each_layer_imports_only_what_its_whitelist_allows():
    crossing = {}
    for module, deps in GRAPH.items():
        if module in TOOLS:
            allowed = LIBRARY | {"twincar"}
        elif module in FACADE:
            allowed = FACADE[module]
        else:
            members, below = LAYERS[layer(module)]
            allowed = members | below
        bad = sorted(d for d in deps if not within(d, allowed))
        if bad:
            crossing[module] = bad
    assert crossing == {}


def test_no_tool_imports_another():
    crossing = {m: sorted(d for d in deps if d in TOOLS) for m, deps in GRAPH.items()}
    assert {m: d for m, d in crossing.items() if d} == {}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_of_three():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_of_any_length():
    # a package's __init__ that only names its submodules lazily is part of the package, not a cycle of it
    graph = {m: {d for d in deps if not (m in FACADE or d in FACADE)} for m, deps in GRAPH.items()}
    assert strongly_connected(graph) == []


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
