"""The package's layers point one way: kernels and file readers <- models <-
processors <- loading/generation <- training <- the commands. Read from each
module's own import statements (ast), so a new upward or circular import fails
here with its file and line, whether or not it would run."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_vlm_native"

# lowest first; a module may import its own layer and the ones below
LAYERS = (
    ("kernels and file readers", ("native", "weights", "engine")),
    ("models", ("models",)),
    ("processors", ("processors",)),
    ("loading and generation", ("utils", "adapters", "conversations", "params", "generate", "convert", "fuse",
                                "caption")),
    ("training", ("training",)),
    ("commands", ("chat", "server", "openai_api", "http_limits", "train", "selftest", "cli", "__main__", "__init__")),
)
# imported inside functions on purpose: optional and heavy, or the peer project
LAZY_ALLOWED = ("torch", "transformers", "tokenizers", "sentencepiece", "mlx_vlm", "jinja2")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"mlx_vlm_native/{name.replace('.', '/')}.py is in no layer of tests/test_layers.py")


def is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def imports(path: Path):
    """(line, imported package module or None for another package, imported name, nested) of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node, nested):
        for child in ast.iter_child_nodes(node):
            if is_main_block(child):
                continue  # a module run as a script is a command: it may import the CLI
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, alias.name, inner
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".") if package != "__init__" else []
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    module = ".".join(["mlx_vlm_native", *filter(None, base), *filter(None, [child.module])])
                else:
                    module = child.module
                for alias in child.names:
                    yield child.lineno, f"{module}.{alias.name}", inner
            yield from walk(child, inner)

    yield from walk(tree, False)


def package_target(imported: str):
    """The package module an import reaches (`mlx_vlm_native.x.y` -> `x.y`), or None."""
    if not imported.startswith("mlx_vlm_native."):
        return None
    parts = imported.split(".")[1:]
    while parts:
        candidate = PACKAGE.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts = parts[:-1]
    return "__init__"


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_layer_or_lower():
    wrong = set()
    for path in sources():
        name = module_name(path)
        for line, imported, _ in imports(path):
            target = package_target(imported)
            if target is not None and target != "__init__" and layer_of(target) > layer_of(name):
                wrong.add(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[layer_of(name)][0]}) imports "
                          f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {}
    for path in sources():
        name = module_name(path)
        graph[name] = {t for _, imported, _ in imports(path)
                       if (t := package_target(imported)) not in (None, name)}
    # `__init__` re-exports; importing a submodule runs it, which is not an import of its names
    graph.pop("__init__", None)
    state, cycle = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, trail + [node]):
                return True
        state[node] = "done"
        return False

    for node in sorted(graph):
        if node not in state and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_imports_are_at_the_top_of_modules():
    """Except for optional heavy dependencies, and `if __name__ == "__main__":` blocks."""
    nested = {f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported.rpartition('.')[0] or imported} "
              "inside a function"
              for path in sources() for line, imported, inner in imports(path)
              if inner and imported.split(".")[0] not in LAZY_ALLOWED}
    assert not nested, "\n".join(sorted(nested))


def test_the_layer_checks_see_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves: a model importing the training package is reported."""
    fake = tmp_path / "mlx_vlm_native"
    (fake / "models").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "models" / "__init__.py").write_text("")
    (fake / "training" / "__init__.py").write_text("")
    (fake / "models" / "toy.py").write_text("from ..training import loop\n\n\ndef f():\n    import numpy\n")
    (fake / "training" / "loop.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = [(package_target(i), inner) for _, i, inner in imports(fake / "models" / "toy.py")]
    assert found == [("training.loop", False), (None, True)]
    assert layer_of("training.loop") > layer_of("models.toy")


def test_no_task_module_imports_another():
    """Tasks (`training.TASKS`, and the helper module a task owns) share the
    substrate (loop, stream, config, optim, checkpoint, data), never each other."""
    from mlx_vlm_native.training import TASKS

    owned = {"eve_align": "eve"}  # a task's own helper module
    tasks = set(TASKS.values()) | set(owned)
    wrong = []
    for name in sorted(tasks):
        path = PACKAGE / "training" / f"{name}.py"
        for line, imported, _ in imports(path):
            target = package_target(imported)
            if target is None or not target.startswith("training."):
                continue
            other = target.split(".")[1]
            if other in tasks and other != name and owned.get(other) != name:
                wrong.append(f"mlx_vlm_native/training/{name}.py:{line} imports the task module {target}")
    assert not wrong, "\n".join(wrong)
