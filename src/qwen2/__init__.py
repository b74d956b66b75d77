"""qwen2: a PyTorch-native implementation of the Qwen2 Technical Report (arXiv 2407.10671).

Public API (imported lazily, so `import qwen2` stays cheap):
    ModelConfig, Qwen2, load_model, save_model, load_tokenizer, save_tokenizer, generate, Engine
"""

from importlib import import_module

_EXPORTS = {
    "ModelConfig": "qwen2.config",
    "Qwen2": "qwen2.model",
    "load_model": "qwen2.checkpoint",
    "save_model": "qwen2.checkpoint",
    "load_tokenizer": "qwen2.tokenizer.bpe",
    "save_tokenizer": "qwen2.tokenizer.save",
    # the function; its module is qwen2.generation, so importing it never shadows it
    "generate": "qwen2.generation",
    "Engine": "qwen2.engine.engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen2' has no attribute {name!r}")
