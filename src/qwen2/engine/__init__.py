"""The continuous-batching engine: Sequence and Scheduler (scheduler), the paged KV cache and its
BlockManager (paged_cache), and the Engine that steps them (engine).

    from qwen2.engine import Engine
"""

from qwen2.engine.engine import Engine

__all__ = ["Engine"]
