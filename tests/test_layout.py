"""The package's layering: folders are layers, each imports only from its own folder or those
below it, and no two modules import each other, even through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_jax"

# Bottom to top, as the README's layout section draws them.
LAYERS = ["runtime", "ops", "models", "weights", "data", "training", "inference", "cli"]
LEVEL = {name: level for level, name in enumerate(LAYERS)}


def modules() -> dict[str, Path]:
    """'models.resnet' -> its path, for every module of the package but its lazy __init__."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts != ("__init__",):
            found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imported(path: Path) -> set[str]:
    """The resnet_jax modules `path` imports (at the top or inside functions), without the
    'resnet_jax.' prefix: 'models.resnet', or 'models' for the folder itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_jax"):
            base = node.module.removeprefix("resnet_jax").lstrip(".")
            for alias in node.names:  # `from resnet_jax.models import resnet` names a module
                name = f"{base}.{alias.name}" if base else alias.name
                found.add(name if name in modules() else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("resnet_jax."):
                    found.add(alias.name.removeprefix("resnet_jax."))
    return found - {""}


def folder(module: str) -> str:
    return module.split(".")[0]


def test_every_module_sits_in_a_layer_folder():
    outside = [m for m in modules() if folder(m) not in LEVEL and not m.startswith("_")]
    assert outside == [], "put each module in one of the layer folders (see the README's layout)"


def test_no_module_imports_from_a_higher_folder():
    upward = [
        f"{module} imports {other}"
        for module, path in modules().items()
        for other in imported(path)
        if LEVEL.get(folder(other), -1) > LEVEL[folder(module)]
    ]
    assert upward == []


def test_no_import_cycle():
    graph = {m: {o for o in imported(p) if o in modules()} for m, p in modules().items()}
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join([*trail[trail.index(other) :], other]))
            elif other not in state:
                visit(other, [*trail, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_public_modules_declare_all_at_the_top():
    """`__all__` stands right after the imports, before the first definition."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name.startswith("_"):
            continue
        body = ast.parse(path.read_text()).body
        first_def = next(
            (i for i, n in enumerate(body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))),
            len(body),
        )
        names = [
            t.id
            for node in body[:first_def]
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        ]
        if "__all__" not in names:
            missing.append(str(path.relative_to(PACKAGE)))
    assert missing == []


def test_predict_and_convert_import_no_jax():
    """Their --help answers at once: `resnet_jax.cli` and these two load JAX only to run."""
    code = "import sys, resnet_jax.cli.predict, resnet_jax.cli.convert; print('jax' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "False"
