"""The shape of the code base, checked: dependencies point one way (no two
modules import each other, directly or through a chain), gptcore imports
neither framework, each twin never imports the other's framework, the
training loop exists once, and no module grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("gptcore", "jaxgpt", "torchgpt")
MAX_LINES = 400
# reading a torch .pt file needs torch.load: gptcore.formats.torch_pt imports torch inside its reader, only then
OPTIONAL = {("gptcore.formats.torch_pt", "torch")}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module `path` imports, at any depth in the file (function-level
    imports count: they are dependencies too), resolved to project modules
    where they are ones, else the top-level package."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            found.add(target)
    found.discard(name)
    return found


GRAPH = {name: imports(path, name, set(modules())) for name, path in modules().items()}


def test_no_import_cycles():
    """Depth-first search for a back edge among project modules (a package's
    __init__ re-exporting its own submodules is not a cycle)."""
    def edges(name):
        return {t for t in GRAPH[name] if t in GRAPH and not name.startswith(t + ".") and not t.startswith(name + ".")}

    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name, stack):
        state[name] = 1
        for target in sorted(edges(name)):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("package,forbidden", [("gptcore", {"jax", "flax", "optax", "orbax", "torch"}),
                                               ("jaxgpt", {"torch", "torchgpt"}),
                                               ("torchgpt", {"jax", "flax", "optax", "orbax", "jaxgpt"})])
def test_frameworks_stay_apart(package, forbidden):
    wrong = {name: sorted(t for t in targets if t.split(".")[0] in forbidden and (name, t) not in OPTIONAL)
             for name, targets in GRAPH.items() if name.split(".")[0] == package}
    assert not {k: v for k, v in wrong.items() if v}


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_one_training_loop():
    """Only gptcore.loop iterates over training steps; the trainers are thin."""
    loops = [name for name, path in modules().items() if "batches.batch(" in path.read_text()]
    assert loops == ["gptcore.loop"]
    for twin in ("jaxgpt", "torchgpt"):
        assert len((REPO / twin / "train.py").read_text().splitlines()) < 200
