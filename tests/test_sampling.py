"""Logits processors against transformers' on random logits; seeds, greedy, per-row parameters."""

import json

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen2.sampling import SamplingParams, TokenHistory, process_logits, sample

V = 1000


def hf_process(logits, history_ids, p: SamplingParams):
    """transformers' processors for `p`, built in the order its generate() builds them."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature not in (0, 1):
        procs.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs(history_ids, logits.clone())


def random_case(seed, b=4, scale=3.0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, V, generator=g) * scale
    if ties:
        logits = (logits * 2).round() / 2  # many equal values, ties at the top-k boundary
    history = torch.randint(0, V, (b, 30), generator=g)
    return logits, history


CASES = [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen2-Instruct's
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=0.5, top_p=0.95, min_p=0.05),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.9, repetition_penalty=1.5, top_k=5, top_p=0.3, min_p=0.1),
    SamplingParams(repetition_penalty=0.7),  # < 1 rewards repeats
    SamplingParams(top_k=1),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_processors_equal_transformers(case, ties):
    p = CASES[case]
    logits, hist = random_case(case, ties=ties)
    ref = hf_process(logits, hist, p)
    ours = process_logits(logits, p, TokenHistory(hist.tolist(), V))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))  # the same allowed set
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-6, atol=1e-7)


def test_different_params_per_row_equal_each_row_alone():
    logits, hist = random_case(42, b=len(CASES))
    ours = process_logits(logits, CASES, TokenHistory(hist.tolist(), V))
    for i, p in enumerate(CASES):
        ref = hf_process(logits[i : i + 1], hist[i : i + 1], p)
        assert torch.equal(torch.isfinite(ours[i : i + 1]), torch.isfinite(ref))
        torch.testing.assert_close(ours[i : i + 1].softmax(-1), ref.softmax(-1), rtol=1e-6, atol=1e-7)


def test_presence_and_frequency_penalties_are_openais():
    logits, _ = random_case(3, b=1)
    prompt, output = [5, 6, 7], [7, 9, 9, 9]
    hist = TokenHistory([prompt], V, outputs=[output])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = process_logits(logits, p, hist)
    want = logits.clone()
    for tok, count in {7: 1, 9: 3}.items():  # output tokens only; the prompt's 5 and 6 are untouched
        want[0, tok] -= 0.25 * count + 0.5
    torch.testing.assert_close(ours, want)


def test_history_append_counts_output_tokens():
    hist = TokenHistory([[1, 2]], V)
    for t in (3, 3, 2):
        hist.append(torch.tensor([t]))
    assert hist.counts[0, 3] == 2 and hist.counts[0, 2] == 1 and hist.counts[0, 1] == 0
    assert hist.seen[0, [1, 2, 3]].all() and hist.seen[0].sum() == 3


def test_disabled_values_leave_logits_untouched():
    logits, hist = random_case(5)
    out = process_logits(logits, SamplingParams(), TokenHistory(hist.tolist(), V))
    assert torch.equal(out, logits)


def test_greedy_and_top_k_1():
    logits, _ = random_case(7, b=8)
    greedy = sample(logits, SamplingParams(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    for t in (0.5, 1.0, 5.0):
        assert torch.equal(sample(logits, SamplingParams(temperature=t, top_k=1), gen), greedy)


def test_greedy_applies_the_penalties_as_transformers_greedy_does():
    logits, hist = random_case(8, b=2)
    hist[:, 0] = logits.argmax(-1)  # the favourite has been seen
    p = SamplingParams(temperature=0, repetition_penalty=100.0)
    ref = hf_process(logits, hist, SamplingParams(repetition_penalty=100.0)).argmax(-1)
    assert torch.equal(sample(logits, p, history=TokenHistory(hist.tolist(), V)), ref)


def test_same_seed_same_tokens_and_the_distribution_is_right():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    p = SamplingParams(temperature=1.0)
    a = sample(logits, p, torch.Generator().manual_seed(1))
    b = sample(logits, p, torch.Generator().manual_seed(1))
    c = sample(logits, p, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / len(a)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_per_row_generators():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = sample(logits, p, gens)
    for i, s in enumerate((1, 2, 3)):
        assert out[i] == sample(logits[i : i + 1], p, torch.Generator().manual_seed(s))[0]


def test_penalties_without_history_are_an_error():
    with pytest.raises(ValueError, match="history"):
        sample(torch.randn(1, V), SamplingParams(repetition_penalty=1.2))


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("temperature", float("nan")),
        ("max_new_tokens", -1),
    ],
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_generation_config_defaults(tmp_path):
    # Qwen2-7B-Instruct's generation_config.json (SPEC.md 1.4)
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 151643,
                "pad_token_id": 151643,
                "do_sample": True,
                "eos_token_id": [151645, 151643],
                "repetition_penalty": 1.05,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
            }
        )
    )
    p = SamplingParams.from_generation_config(tmp_path)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert p.stop_token_ids == [151645, 151643]
    assert SamplingParams.from_generation_config(tmp_path, temperature=0, top_k=None).temperature == 0
    assert SamplingParams.from_generation_config({"eos_token_id": 151643}).greedy  # base model: no do_sample
    assert SamplingParams.from_generation_config({"do_sample": True}).top_k == 50  # transformers' default
    assert SamplingParams.from_generation_config(tmp_path / "missing").greedy
