"""The continuous-batching engine: Sequence and Scheduler (scheduler), BlockManager (blocks), the paged
KV cache (paged_cache), the Runner that runs the model over it (runner), and the Engine (engine).

    from qwen2.engine import Engine
"""

from qwen2.engine.engine import Engine

__all__ = ["Engine"]
