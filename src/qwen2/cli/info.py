"""`qwen2 info`: a checkpoint's or preset's shape, parameter counts and KV-cache size.

For the published models the counts are checked against the Qwen2 blog / paper figures
(SPEC.md 1.1), so a wrong preset or a wrong counting rule shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

from qwen2.config import (
    PRESETS,
    ModelConfig,
    kv_cache_bytes_per_token,
    matches_published,
    param_counts,
    published_counts,
)


def _n(count: int) -> str:
    return f"{count:,} ({count / 1e9:.3f}B)" if count >= 1e8 else f"{count:,} ({count / 1e6:.2f}M)"


def info(path_or_preset: str) -> str:
    if Path(path_or_preset).exists():
        config = ModelConfig.from_json(path_or_preset)
        name = Path(path_or_preset).name
    elif path_or_preset.removeprefix("Qwen/") in PRESETS:
        config = ModelConfig.preset(path_or_preset)
        name = path_or_preset
    else:
        raise FileNotFoundError(
            f"{path_or_preset}: neither a checkpoint directory nor a preset ({', '.join(PRESETS)})"
        )
    c = param_counts(config)
    kind = (
        f"MoE, {config.num_experts} experts, top-{config.num_experts_per_tok}" if config.is_moe else "dense"
    )
    lines = [
        f"{name}: {config.model_type} ({kind})",
        f"  layers {config.num_hidden_layers}, hidden {config.hidden_size}, "
        f"heads {config.num_attention_heads} "
        f"(kv {config.num_key_value_heads}, head_dim {config.head_dim}), intermediate "
        f"{config.moe_intermediate_size if config.is_moe else config.intermediate_size}, "
        f"vocab {config.vocab_size}",
        f"  rope_theta {config.rope_theta:g}, rope {config.rope_type}"
        + (f" x{config.rope_scaling['factor']}" if config.rope_type == "yarn" else "")
        + f", max positions {config.max_position_embeddings}, tied embeddings {config.tie_word_embeddings}",
        f"  parameters: total {_n(c.total)}, non-embedding {_n(c.non_embedding)}"
        + (f", active per token {_n(c.active)}" if config.is_moe else ""),
        f"  KV cache per token: {kv_cache_bytes_per_token(config, 2):,} bytes in bf16 "
        f"({kv_cache_bytes_per_token(config, 2) * 32768 / 2**30:.2f} GiB for 32,768 tokens, "
        f"{kv_cache_bytes_per_token(config, 2) * 131072 / 2**30:.2f} GiB for 131,072)",
    ]
    published = published_counts(name)
    if published:
        status = "match" if matches_published(config, published) else "DO NOT MATCH"
        ref = f"{published[0]}B total / {published[1]}B non-embedding" + (
            f" / {published[2]}B active" if published[2] else ""
        )
        lines.append(f"  published counts ({ref}): {status}")
    return "\n".join(lines)
