"""transformers as the reference (a test dependency only), for the tests and the benchmarks alike:
configs, random models at our shapes, twins of our models with the same weights, and tokenizers read
from a folder of tokenizer files."""

import functools

import torch
import transformers

from qwen2.config import ModelConfig


def hf_config(config: ModelConfig, attn: str = "eager"):
    """transformers' config for ours; "eager" is the plain math path (softmax in fp32, explicit repeat_kv)."""
    cls = transformers.Qwen2MoeConfig if config.is_moe else transformers.Qwen2Config
    hc = cls(**config.to_dict())
    hc._attn_implementation = attn
    return hc


def hf_twin(model, attn: str = "sdpa"):
    """transformers' model with exactly our model's weights and dtype (the reference in the same run)."""
    config = model.config
    cls = transformers.Qwen2MoeForCausalLM if config.is_moe else transformers.Qwen2ForCausalLM
    hf = cls(hf_config(config, attn)).to(next(model.parameters()).dtype)
    hf.load_state_dict(model.state_dict(), strict=not config.tie_word_embeddings)
    return hf.eval()


@functools.cache
def hf_tokenizer(path):
    """transformers' AutoTokenizer over a folder of tokenizer files (read once per folder)."""
    return transformers.AutoTokenizer.from_pretrained(str(path))


def hf_model(config: ModelConfig, seed: int = 0, std: float = 0.05):
    """A transformers model with random weights, including non-zero biases and non-unit norms."""
    cls = transformers.Qwen2MoeForCausalLM if config.is_moe else transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(hf_config(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model


# Scaled-down shapes of each real config: the real ratios (heads, GQA groups, head_dim, tying,
# eps, vocab padding) with small hidden sizes and few layers.
SCALED = {
    "0.5B": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),  # head_dim 64
    "1.5B": dict(
        hidden_size=256,
        intermediate_size=592,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),  # head_dim 128, GQA 2:1
    "7B": dict(
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1056,
        tie_word_embeddings=False,
    ),  # GQA 4:1 (7:1 in 7B)
    "72B": dict(
        hidden_size=256,
        intermediate_size=904,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=1,
        vocab_size=1056,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),  # GQA 8:1
    "57B-A14B": dict(
        hidden_size=128,
        intermediate_size=296,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=1024,
        tie_word_embeddings=False,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
    ),
}
_BASE = {
    "0.5B": "Qwen2-0.5B",
    "1.5B": "Qwen2-1.5B",
    "7B": "Qwen2-7B",
    "72B": "Qwen2-72B",
    "57B-A14B": "Qwen2-57B-A14B",
}


def scaled_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(_BASE[name]).replace(**SCALED[name], **overrides)
