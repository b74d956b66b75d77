"""The package's shape as DESIGN.md draws it: the dependency direction, no import circles (lazy imports
inside functions count), and a public API that stays what the README says after every submodule is
imported."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import qwen2

SRC = Path(qwen2.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every qwen2 module `name` imports, at any depth of its code (lazy imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def under(name: str, *packages: str) -> bool:
    return any(name == f"qwen2.{p}" or name.startswith(f"qwen2.{p}.") for p in packages)


def test_the_model_core_imports_no_kernels_training_serving_or_data():
    for name in ("qwen2.model", "qwen2.rope", "qwen2.attention"):
        bad = [m for m in GRAPH[name] if under(m, "kernels", "train", "serve", "data", "engine", "cli")]
        assert not bad, f"{name} imports {bad}"


def test_the_tokenizer_imports_nothing_of_ours_but_files():
    for name in MODULES:
        if under(name, "tokenizer"):
            bad = [m for m in GRAPH[name] if not under(m, "tokenizer", "files", "extras")]
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize(
    "low,high",
    [("engine", "serve"), ("data", "engine"), ("eval", "train"), ("kernels", "train"), ("data", "train")],
)
def test_lower_layers_never_import_higher_ones(low, high):
    for name in MODULES:
        if under(name, low):
            bad = [m for m in GRAPH[name] if under(m, high)]
            assert not bad, f"{name} imports {bad}"


def test_nothing_imports_the_cli():
    for name, deps in GRAPH.items():
        if not under(name, "cli"):
            assert not [m for m in deps if under(m, "cli")], f"{name} imports the cli"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                circle = path[path.index(dep) :] + [dep]
                pytest.fail("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_public_api_after_importing_every_submodule():
    skip = ("qwen2.cli.__main__",)
    for info in pkgutil.walk_packages(qwen2.__path__, "qwen2."):
        if info.name not in skip:
            importlib.import_module(info.name)
    for name in qwen2.__all__:
        obj = getattr(qwen2, name)
        assert not inspect.ismodule(obj), f"qwen2.{name} is a module, not the API object"
        assert callable(obj), f"qwen2.{name} is not callable"
    assert qwen2.generate.__name__ == "generate" and inspect.isfunction(qwen2.generate)
    assert (
        inspect.isclass(qwen2.Engine) and inspect.isclass(qwen2.ModelConfig) and inspect.isclass(qwen2.Qwen2)
    )
