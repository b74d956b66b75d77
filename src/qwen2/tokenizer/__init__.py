"""Qwen2's tokenizer: byte-level BPE (bpe), ChatML and loss masks (chat), tool calls (tools),
incremental detokenisation with stop strings (stream) and training a Qwen2-style tokenizer (train).

    from qwen2.tokenizer import load_tokenizer, save_tokenizer
    tok = load_tokenizer("Qwen2")          # the built-in Qwen2 vocabulary, or a checkpoint folder
    save_tokenizer(tok, "my-checkpoint")   # tokenizer.json, vocab.json, merges.txt, ... for transformers too
"""

from qwen2.tokenizer.bpe import ENDOFTEXT, IM_END, IM_START, Tokenizer, load_tokenizer
from qwen2.tokenizer.save import save_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "save_tokenizer", "ENDOFTEXT", "IM_START", "IM_END"]
