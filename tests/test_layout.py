"""The package's layering: each module imports only from its own layer or those below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_jax"

# Bottom to top, as ../shared/DESIGN.md and the README's layout section draw it.
LAYERS = [
    {"errors", "files", "cache", "registry", "memory"},
    {"ops", "kernels", "models", "nnx"},
    {"convert", "torch_pickle", "torch_format", "metadata", "hub", "weights"},
    {"transforms", "sources", "tfds_source", "data", "synthetic"},
    {
        "optim",
        "steps",
        "parallel",
        "checkpoint",
        "reporting",
        "transfer",
        "config",
        "confusion",
        "tensorboard",
    },
    {"trainer", "gradcam", "inference", "predict_output"},
    {"cli"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_modules(path: Path) -> set[str]:
    """The resnet_jax modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("resnet_jax")
        ):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from resnet_jax import transforms
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("resnet_jax.")
            )
    return found


def test_every_module_has_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules - set(LAYER) == set(), "add new modules to LAYERS (and to DESIGN.md)"


def test_no_module_imports_one_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":  # the lazy public namespace re-exports
            continue
        name = module_name(path)
        for imported in imported_modules(path):
            if imported in LAYER and LAYER[imported] > LAYER[name]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert upward == []


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
            missing.append(path.name)
    assert missing == []
