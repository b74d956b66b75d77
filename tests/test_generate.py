"""generate(): greedy equals transformers' generate, batches equal single prompts, stops, the KV cache."""

import pytest
import torch

from hf_reference import hf_model, scaled_config
from qwen2 import load_model
from qwen2.config import ModelConfig
from qwen2.generation import ChatSession, KVCache, decode_one, generate, prefill, stream_text
from qwen2.model import build_model
from qwen2.sampling import SamplingParams


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    out = hf.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def prompts(vocab: int, lengths=(7, 19, 1, 12), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def check_greedy_matches_hf(config: ModelConfig, tmp_path, n: int, lengths):
    hf = hf_model(config, seed=0)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    rows = prompts(config.vocab_size, lengths)
    refs = [hf_greedy(hf, p, n) for p in rows]
    assert list(generate(ours, rows[0], n, temperature=0)) == refs[0]
    batch = generate(ours, rows, n, temperature=0)
    steps = list(batch)
    assert len(steps) == n and batch.output_ids == refs
    assert batch.finish_reasons == ["length"] * len(rows)


def test_greedy_equals_transformers_scaled_05b(tmp_path):
    check_greedy_matches_hf(scaled_config("0.5B"), tmp_path, n=64, lengths=(7, 19, 1, 12))


def test_greedy_equals_transformers_gqa(tmp_path):
    # 7B-like GQA 4:1, untied output layer: the folded-GQA decode path
    check_greedy_matches_hf(scaled_config("7B"), tmp_path, n=24, lengths=(5, 11))


@pytest.mark.slow
def test_greedy_equals_transformers_real_05b_shape(tmp_path):
    check_greedy_matches_hf(ModelConfig.preset("Qwen2-0.5B"), tmp_path, n=64, lengths=(9, 31, 17))


@pytest.fixture(scope="module")
def tiny():
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model


def test_cached_decode_equals_full_forward(tiny):
    config = tiny.config
    x = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(x).float()
    cache = KVCache(config, 2, 16)
    logits = prefill(tiny, x[:, :5], cache)
    torch.testing.assert_close(logits, full[:, 4], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        logits = decode_one(tiny, x[:, t : t + 1], torch.full((2, 1), t), cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_greedy_equals_uncached_argmax_loop(tiny):
    prompt = [3, 1, 4, 1, 5]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert list(generate(tiny, prompt, 20, temperature=0)) == ids[len(prompt) :]


def test_batch_rows_equal_single_prompts_when_sampling(tiny):
    # Row i draws from a generator seeded seed + i: the same row alone with that seed gives the same tokens.
    rows = prompts(tiny.config.vocab_size, (3, 9, 5))
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2)
    batch = generate(tiny, rows, 16, seed=7, **kw)
    list(batch)
    for i, r in enumerate(rows):
        assert batch.output_ids[i] == list(generate(tiny, r, 16, seed=7 + i, **kw))


def test_stop_token_ends_the_row_and_is_its_last_id(tiny):
    free = list(generate(tiny, [1, 2, 3], 30, temperature=0))
    stop = free[5]
    first = free.index(stop)
    g = generate(tiny, [1, 2, 3], 30, temperature=0, stop_token_ids=[stop])
    assert list(g) == free[: first + 1] and g.finish_reason == "stop"
    g = generate(tiny, [1, 2, 3], 4, temperature=0)
    assert len(list(g)) == 4 and g.finish_reason == "length"


def test_batch_rows_stop_independently(tiny):
    rows = [[1, 2, 3], [7, 8]]
    free = [list(generate(tiny, r, 20, temperature=0)) for r in rows]
    stop = free[0][2]
    g = generate(tiny, rows, 20, temperature=0, stop_token_ids=[stop])
    list(g)
    for out, ref in zip(g.output_ids, free):
        k = ref.index(stop) + 1 if stop in ref else len(ref)
        assert out == ref[:k]


def test_bad_prompts_are_refused(tiny):
    context = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        generate(tiny, [1] * context, 5)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(tiny, [1, tiny.config.vocab_size], 5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [], 5)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(tiny, [1, 2], 5, stop=["x"])
    # max_new_tokens is cut to what the context leaves
    assert len(list(generate(tiny, [1] * (context - 3), 10, temperature=0))) == 3


def test_generation_config_defaults(tiny, monkeypatch):
    monkeypatch.setattr(
        tiny,
        "generation_config",
        {"do_sample": True, "temperature": 0.7, "top_k": 1, "eos_token_id": [1]},
        raising=False,
    )
    greedy = list(generate(tiny, [5, 6], 8, temperature=0))
    g = generate(tiny, [5, 6], 8)  # top_k 1 from the config: greedy's tokens, then the eos rule applies
    out = list(g)
    k = greedy.index(1) + 1 if 1 in greedy else len(greedy)
    assert out == greedy[:k]


def test_compiled_decode_step_gives_the_same_tokens(tiny):
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    eager = list(generate(tiny, [9, 8, 7], 12, temperature=0))
    assert list(generate(tiny, [9, 8, 7], 12, temperature=0, compile=True)) == eager


# ---- stop strings ---------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed token script (one-hot logits), to drive generate()."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.config = ModelConfig.preset("tiny").replace(vocab_size=vocab, max_position_embeddings=4096)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(1, 1)
        self.script, self.prompt_len = script, None

    def hidden_states(self, ids, positions, cache=None):
        return positions.unsqueeze(-1).float()  # [B, T, 1]: the position, read back by logits()

    def logits(self, h):
        step = int(h[0, 0].item()) + 1 - self.prompt_len
        out = torch.full((h.shape[0], self.config.vocab_size), -1e9)
        out[:, self.script[min(step, len(self.script) - 1)]] = 0
        return out

    def forward(self, ids, positions, cache=None):
        return self.logits(self.hidden_states(ids, positions)[:, -1])[:, None]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from qwen2.tokenizer.bpe import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def run_script(tok, pieces: list[str], stop, **kw):
    script = [t for p in pieces for t in tok.encode(p)] + [tok.encode("!")[0]] * 4
    model = Scripted(script, 151936)
    prompt = tok.encode("Say:")
    model.prompt_len = len(prompt)
    g = generate(model, prompt, len(script), temperature=0, tokenizer=tok, stop=stop, **kw)
    ids = list(g)
    return ids, g, script


def test_stop_string_split_across_tokens_is_never_emitted(tok):
    ids, g, script = run_script(tok, ["Hello", " wor", "ld", " and more"], stop=["world"])
    text = tok.decode(ids)
    assert "world" not in text and "wor" not in text and text == "Hello "[: len(text)]
    assert g.texts[0] == "Hello " and g.finish_reason == "stop"
    # the ids released are a prefix of what was sampled, and end before the stop string starts
    assert ids == script[: len(ids)] and tok.decode(ids) in ("Hello", "Hello ")


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok):
    ids, g, _ = run_script(tok, ["Hello", " wor", "m", " turns"], stop=["world"])
    assert g.texts[0].startswith("Hello worm turns") and g.finish_reason == "length"
    assert tok.decode(ids) == g.texts[0]


def test_stop_string_inside_one_token(tok):
    ids, g, _ = run_script(tok, ["The answer: 42.", " Done"], stop=[": 4", "nothing"])
    assert g.texts[0] == "The answer" and ": 4" not in tok.decode(ids)


def test_stream_text_is_the_text_before_the_stop(tok):
    script = tok.encode("Hello world, again") + [tok.im_end_id]
    model = Scripted(script, 151936)
    model.prompt_len = 2
    pieces = list(stream_text(model, tok, [1, 2], max_new_tokens=50, temperature=0, stop=[", a"]))
    assert "".join(pieces) == "Hello world"
    pieces = list(
        stream_text(model, tok, [1, 2], max_new_tokens=50, temperature=0, stop_token_ids=[tok.im_end_id])
    )
    assert "".join(pieces) == "Hello world, again"  # the stop token's text is not shown


# ---- chat session reuses its cache ----------------------------------------------------------------
def test_chat_session_reuses_the_cache(tiny, tok):
    class T:  # the fixture tokenizer's decoding over the tiny vocabulary
        def __len__(self):
            return 512

        def decode_bytes(self, ids):
            return bytes(i % 128 for i in ids)

    params = SamplingParams(temperature=0, max_new_tokens=6)
    s = ChatSession(tiny, T(), params, chunk=64)
    first = [1, 2, 3, 4]
    "".join(s.reply(first))
    turn1 = s.last.sampled[0]
    second = first + turn1 + [5, 6]
    "".join(s.reply(second))
    assert (
        s.last.prompt_tokens == 2 + 1
    )  # only the new tokens (+ the last reply token, never run) are prefilled
    assert s.last.output_ids[0] == list(generate(tiny, second, 6, temperature=0))


def test_one_row_bf16_linear_matches_the_fp32_product():
    # model.linear sends one bf16 row through torch.mv (the decode step's fast path): same product
    from qwen2.kernels.layers import linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 32, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    for shape in [(1, 1, 32), (1, 32), (3, 32)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        ref = x.float() @ w.float().T + b.float()
        y = linear(x, w, b)
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)
