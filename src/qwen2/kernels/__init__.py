"""Machine speed applied from outside the model (DESIGN principle 9): the C kernels (cpu_kernels.c), their
Python and torch-op wrappers (ops.py) and the layer swaps that use them (layers.py).

    from qwen2 import kernels
    kernels.install(model)   # checkpoint.load_model does this for CPU models
    kernels.status()         # one line: built, or why not
"""

from qwen2.kernels.layers import install, uninstall
from qwen2.kernels.ops import status

__all__ = ["install", "uninstall", "status"]
