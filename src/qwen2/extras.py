"""Optional dependencies, one feature at a time (DESIGN.md principle 11: extras per feature).

The core needs torch, safetensors, a BPE engine, jinja2, numpy and tqdm; everything else is an extra of
pyproject.toml (serve: fastapi + uvicorn, plot: matplotlib, train: tensorboard + pyyaml, data: pyarrow).
A feature that needs one calls `require(module, extra, feature)` where it starts; a missing package
becomes `MissingExtra` with one line that names the fix, which the CLI prints instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; `str(e)` is the one line to show the user."""

    def __init__(self, module: str, extra: str, feature: str):
        self.module, self.extra, self.feature = module, extra, feature
        package = module.split(".")[0]  # what pip installs: pyarrow, not pyarrow.parquet
        super().__init__(f"{feature} needs {package}: pip install 'qwen2[{extra}]'", name=package)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` (dotted names work: "pyarrow.parquet") or raise MissingExtra naming `extra`.

    Only the module itself (or a package above it) being absent counts as missing: an installed
    package whose own import fails (a broken dependency inside it) raises its real error, which
    "pip install" would not fix."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        if e.name not in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise
        raise MissingExtra(module, extra, feature) from None
