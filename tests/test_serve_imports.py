"""qwen2.serve has no import circle, and nothing in it but __init__ imports the routes (app.py).

Two checks: the source (an import anywhere in a file, lazy ones inside functions included: DESIGN.md
counts a lazy import that hides a circle), and a fresh interpreter that imports the package's modules
in many orders: each module first (a circle fails with "partially initialized module" when it is
entered at the wrong module), then the rest forwards and backwards, and finds app.py loaded only once
app itself was imported.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qwen2.serve

SERVE = Path(qwen2.serve.__file__).parent
FILES = {("qwen2.serve" if p.stem == "__init__" else f"qwen2.serve.{p.stem}"): p for p in SERVE.glob("*.py")}
MODULES = sorted(m for m in FILES if m != "qwen2.serve")  # the package's __init__ runs first anyway


def imported_names(path: Path) -> set[str]:
    """Every module name an import anywhere in the file names (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: every file here sits in qwen2.serve
                base = ".".join(["qwen2", "serve"][: 3 - node.level] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("name", sorted(set(FILES) - {"qwen2.serve", "qwen2.serve.app"}))
def test_no_serve_module_but_init_imports_app(name):
    assert "qwen2.serve.app" not in imported_names(FILES[name]), f"{name} imports qwen2.serve.app"


def test_imported_names_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    for text in (
        "def f():\n    from qwen2.serve.app import create_app\n",
        "from . import app\n",
        "from .app import serve\n",
        "import qwen2.serve.app\n",
    ):
        src.write_text(text)
        assert "qwen2.serve.app" in imported_names(src), text


SCRIPT = """
import importlib, sys

def fresh():  # forget qwen2.serve only: nothing below it imports it (test_layout.py)
    for m in [m for m in sys.modules if m == "qwen2.serve" or m.startswith("qwen2.serve.")]:
        del sys.modules[m]

modules = sys.argv[1:]
orders = [[m] + rest for m in modules for rest in ([x for x in modules if x != m],
                                                   [x for x in reversed(modules) if x != m])]
for order in orders:
    fresh()
    for m in order:
        importlib.import_module(m)
        if m != "qwen2.serve.app" and "qwen2.serve.app" not in order[: order.index(m)]:
            assert "qwen2.serve.app" not in sys.modules, f"importing {m} ({order}) loaded qwen2.serve.app"
    from qwen2.serve import create_app, serve
    app = sys.modules["qwen2.serve.app"]
    assert create_app is app.create_app and serve is app.serve, "qwen2.serve's exports are not app's"
print(len(orders))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, *MODULES], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == 2 * len(MODULES)


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_a_missing_serve_extra_is_one_line_from_the_cli(missing, tmp_path):
    """Without fastapi (importing qwen2.serve) or uvicorn (serve()), `qwen2 serve` prints one line naming
    the extra and exits 2, before it loads anything. sys.modules[name] = None is how Python blocks one."""
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from qwen2.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(tmp_path / 'ckpt')!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    feature = "qwen2.serve (the OpenAI-compatible server)" if missing == "fastapi" else "serving over HTTP"
    want = f"qwen2 serve: error: {feature} needs {missing}: pip install 'qwen2[serve]'"
    assert run.stderr.strip().splitlines() == [want]


def test_require_names_the_extra_and_keeps_real_import_errors(tmp_path, monkeypatch):
    from qwen2.extras import MissingExtra, require

    assert require("json.decoder", "none", "x") is sys.modules["json.decoder"]
    with pytest.raises(MissingExtra) as e:
        require("no_such_pkg_q2.sub", "data", "reading parquet")
    assert str(e.value) == "reading parquet needs no_such_pkg_q2: pip install 'qwen2[data]'"
    assert isinstance(e.value, ImportError) and e.value.extra == "data"
    # Installed but broken inside (its own dependency is missing): pip install qwen2[...] would not fix it.
    (tmp_path / "broken_pkg_q2").mkdir()
    (tmp_path / "broken_pkg_q2" / "__init__.py").write_text("import not_there_q2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("broken_pkg_q2", "serve", "x")
    assert not isinstance(e.value, MissingExtra) and e.value.name == "not_there_q2"
