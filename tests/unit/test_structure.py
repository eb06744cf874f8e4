"""The package's layering, read from the source (DESIGN.md seams 1 and 5).

Every import is read with `ast`, including imports inside functions and the module paths that lazy
``__getattr__`` tables hand to ``importlib.import_module``, so an import hidden in a function still
counts. Layers (low to high): config < data, layers/loss/heads/generation, vision < models <
fp8/parallel < checkpoint < training < cli. An import may only point down or sideways, model code
never reaches distributed/DeepSpeed/TE or a higher package, and no files import each other in a loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "deepsuite"

LAYER = {
    "config": 0,
    "data": 1,
    "layers": 1,
    "loss": 1,
    "heads": 1,
    "generation": 1,
    "vision": 1,
    "models": 2,
    "fp8": 3,
    "parallel": 3,
    "checkpoint": 4,
    "training": 5,
    "cli": 6,
    "__main__": 6,
    "": 7,  # deepsuite/__init__.py
}
MODEL_SIDE = ("models", "layers", "heads", "loss", "generation")
FORBIDDEN_IN_MODEL_CODE = (
    "torch.distributed",
    "deepspeed",
    "transformer_engine",
    "deepsuite.parallel",
    "deepsuite.fp8",
    "deepsuite.training",
    "deepsuite.checkpoint",
    "deepsuite.vision",
)
# The one upward edge DESIGN.md asks for: `deepsuite.models.load_hf` / `save_hf` are public
# re-exports of the checkpoint functions, resolved lazily on first attribute access.
ALLOWED_UPWARD = (("deepsuite.models", "deepsuite.checkpoint.hf"),)

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute names), lazy and string-named ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    calls_import_module = False
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                calls_import_module = True
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value)
        ):
            strings.add(node.value)
        elif isinstance(node, ast.Attribute) and ast.unparse(node) == "torch.distributed":
            found.add("torch.distributed")
    if calls_import_module:
        found.update(strings)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``module -> imported modules`` for every file under the package ``root``."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def _part(module: str, package: str) -> str | None:
    if module != package and not module.startswith(package + "."):
        return None
    rest = module[len(package) + 1 :] if module != package else ""
    return rest.split(".")[0]


def layering_violations(graph: dict[str, set[str]], package: str = "deepsuite") -> list[str]:
    """Upward imports between layers and forbidden imports from model code, one line each."""
    problems = []
    for module, targets in sorted(graph.items()):
        src = _part(module, package) or ""
        for target in sorted(targets):
            if (module, target) in ALLOWED_UPWARD:
                continue
            if src in MODEL_SIDE and any(
                target == f or target.startswith(f + ".") for f in FORBIDDEN_IN_MODEL_CODE
            ):
                problems.append(f"model code {module} imports {target}")
                continue
            dst = _part(target, package)
            if dst is None or dst not in LAYER or src not in LAYER:
                continue
            if LAYER[dst] > LAYER[src]:
                problems.append(f"{module} (layer {src}) imports the higher layer {target}")
            elif dst == "vision" and src != "vision":
                problems.append(f"{module} imports the vision package ({target})")
    return problems


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    allowed = set(ALLOWED_UPWARD)

    def edges(v: str) -> list[str]:
        return [w for w in graph.get(v, ()) if w in graph and w != v and (v, w) not in allowed]

    def visit(v: str) -> None:  # Tarjan, iterative enough for a package of this size
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_layers_import_downward_only() -> None:
    assert layering_violations(import_graph(PACKAGE_ROOT)) == []


def test_no_import_loops() -> None:
    assert import_loops(import_graph(PACKAGE_ROOT)) == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("rel", "line", "expected"),
    [
        (
            "layers/moe.py",
            "import torch.distributed as dist\n",
            "model code deepsuite.layers.moe imports torch.distributed",
        ),
        ("heads/h.py", "def f():\n    import deepspeed\n", "model code deepsuite.heads.h imports deepspeed"),
        (
            "loss/l.py",
            "def f():\n    from deepsuite.fp8 import te\n",
            "model code deepsuite.loss.l imports deepsuite.fp8",
        ),
        (
            "models/m.py",
            "import torch\n\ndef f():\n    return torch.distributed.get_rank()\n",
            "imports torch.distributed",
        ),
        (
            "generation/g.py",
            "from deepsuite.checkpoint import io\n",
            "model code deepsuite.generation.g imports",
        ),
        ("models/v.py", "from deepsuite.vision import heads\n", "imports deepsuite.vision"),
        (
            "config/c.py",
            "import importlib\n\ndef f():\n    importlib.import_module('deepsuite.models.m')\n",
            "higher layer",
        ),
        (
            "checkpoint/k.py",
            "from deepsuite.training import loop\n",
            "(layer checkpoint) imports the higher layer",
        ),
        (
            "parallel/p.py",
            "def f():\n    from deepsuite.checkpoint.io import x\n",
            "(layer parallel) imports the higher",
        ),
    ],
)
def test_checker_catches_forbidden_imports(tmp_path: Path, rel: str, line: str, expected: str) -> None:
    """The checker is not vacuous: each kind of forbidden import added to a tiny tree is reported."""
    root = tmp_path / "deepsuite"
    for pkg in (
        "models",
        "layers",
        "heads",
        "loss",
        "generation",
        "config",
        "checkpoint",
        "training",
        "parallel",
    ):
        _write(root, f"{pkg}/__init__.py", "")
    _write(root, "__init__.py", "")
    _write(root, "checkpoint/io.py", "x = 1\n")
    _write(root, "training/loop.py", "")
    _write(root, "models/m.py", "")
    _write(root, rel, line)
    problems = layering_violations(import_graph(root))
    assert any(expected in p for p in problems), problems


def test_checker_catches_loops(tmp_path: Path) -> None:
    root = tmp_path / "deepsuite"
    _write(root, "__init__.py", "")
    _write(root, "checkpoint/__init__.py", "")
    _write(root, "checkpoint/a.py", "def f():\n    from deepsuite.checkpoint import b\n")
    _write(root, "checkpoint/b.py", "from deepsuite.checkpoint.c import g\n")
    _write(root, "checkpoint/c.py", "from deepsuite.checkpoint.a import f\n")
    assert import_loops(import_graph(root)) == [
        ["deepsuite.checkpoint.a", "deepsuite.checkpoint.b", "deepsuite.checkpoint.c"]
    ]
