"""Weight-only int8 / int4: the layers equal a matmul with their dequantized weights, the rounding error
is at most half a step, quantized checkpoints round-trip through save/load and `qwen2 quantize`."""

import json

import pytest
import torch

from qwen2 import load_model, save_model
from qwen2.cli import main
from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.quantize import (
    Int4Linear,
    Int8Linear,
    apply_quantization,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes_per_token,
)


def weights(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1  # rows of different scales
    return w, torch.randn(5, k, generator=g), torch.randn(n, generator=g)


def int8_layer(w, bias=None, dtype=torch.float32):
    layer = Int8Linear(w.shape[1], w.shape[0], bias is not None, dtype=dtype)
    layer.weight, layer.scales = quantize_int8(w, dtype)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def int4_layer(w, group_size, bias=None, dtype=torch.float32):
    layer = Int4Linear(w.shape[1], w.shape[0], bias is not None, group_size=group_size, dtype=dtype)
    layer.weight, layer.scales, layer.zeros = quantize_int4(w, group_size, dtype)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.prepare()
    return layer


# ---- the layers -------------------------------------------------------------------------------------
def test_int8_is_per_output_channel_and_within_half_a_step():
    w, x, b = weights()
    layer = int8_layer(w, b)
    q, s = layer.weight, layer.scales
    assert q.dtype == torch.int8 and s.shape == (w.shape[0],)
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range
    err = (layer.dequantize() - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [128, 32])
def test_int4_is_groupwise_and_within_half_a_step(group_size):
    w, x, b = weights()
    layer = int4_layer(w, group_size, b)
    groups = w.shape[1] // group_size
    assert layer.scales.shape == layer.zeros.shape == (w.shape[0], groups)
    assert layer.weight.shape == (w.shape[0], w.shape[1] // 2) and layer.weight.dtype == torch.uint8
    q = unpack_int4(layer.weight)
    assert q.max() <= 15
    # each group's min and max are representable: the 4-bit grid spans the group's range
    deq = layer.dequantize()
    err = (deq - w).abs().reshape(w.shape[0], groups, group_size)
    assert (err <= layer.scales[..., None] / 2 * (1 + 1e-4) + 1e-7).all()
    torch.testing.assert_close(layer(x), x @ deq.T + b, rtol=1e-5, atol=1e-5)
    # the torch int4 kernel and the dequantize fallback agree
    assert layer.packed is not None
    kernel = layer(x)
    layer.packed = None
    torch.testing.assert_close(kernel, layer(x), rtol=1e-5, atol=1e-5)


def test_smaller_int4_groups_fit_better():
    w, _, _ = weights(k=512)
    errors = [(int4_layer(w, g).dequantize() - w).pow(2).mean() for g in (256, 128, 32)]
    assert errors[0] > errors[1] > errors[2]


def test_bf16_activations_through_the_kernels():
    w, x, _ = weights()
    for layer in (int8_layer(w, dtype=torch.bfloat16), int4_layer(w, 128, dtype=torch.bfloat16)):
        y = layer(x.bfloat16())
        ref = x @ layer.dequantize().T
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref).norm() / ref.norm() < 1e-2  # bf16 rounding of activations and output only


def test_bad_layer_specs_are_refused():
    w, _, _ = weights()
    with pytest.raises(ValueError, match="group_size 100 must divide in_features 256"):
        Int4Linear(256, 48, group_size=100)
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_model(model, bits=3)
    with pytest.raises(ValueError, match="does not divide in_features 64"):
        quantize_model(model, bits=4, group_size=128)  # tiny's hidden size is 64
    assert model.config.quantization is None and isinstance(
        model.model.layers[0].mlp.up_proj, torch.nn.Linear
    )


# ---- whole models --------------------------------------------------------------------------------
def realistic(config: ModelConfig, std=0.05) -> torch.nn.Module:
    """Random weights at a scale where the logits are far from uniform."""
    model = build_model(config, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=g)
    return model


CONFIG = ModelConfig.preset("tiny").replace(hidden_size=128, intermediate_size=256, torch_dtype="float32")


def ids(n=24, seed=0):
    return torch.randint(0, CONFIG.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trips(tmp_path, bits):
    model = quantize_model(realistic(CONFIG), bits=bits)
    with torch.no_grad():
        before = model(ids())
    save_model(model, tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert spec == {
        "method": "weight_only",
        "bits": bits,
        "group_size": 128 if bits == 4 else None,
        "lm_head": True,
    }
    loaded = load_model(tmp_path)
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, kind) and isinstance(loaded.lm_head, kind)
    with torch.no_grad():
        assert torch.equal(loaded(ids()), before)


def test_int8_logits_stay_close_to_float():
    model = realistic(CONFIG)
    with torch.no_grad():
        ref = model(ids())
        assert ref.softmax(-1).amax() > 5 / CONFIG.vocab_size  # not uniform
        quantize_model(model, bits=8)
        rel = ((model(ids()) - ref).norm() / ref.norm()).item()
    assert rel < 0.02  # each weight is within 1/254 of its row's largest


def test_int8_is_closer_than_int4_and_fewer_bytes_each_step():
    float_model = realistic(CONFIG)
    with torch.no_grad():
        ref = float_model(ids())
    errors, sizes = [], [weight_bytes_per_token(float_model)]
    for bits in (8, 4):
        m = quantize_model(realistic(CONFIG), bits=bits, group_size=32)
        with torch.no_grad():
            errors.append((m(ids()) - ref).norm().item())
        sizes.append(weight_bytes_per_token(m))
    assert errors[0] < errors[1] and sizes[0] > sizes[1] > sizes[2]


def test_tied_output_layer_is_untied_and_the_embedding_stays_float(tmp_path):
    model = quantize_model(realistic(CONFIG), bits=8)
    assert model.config.tie_word_embeddings is False
    assert model.model.embed_tokens.weight.dtype == torch.float32 and isinstance(model.lm_head, Int8Linear)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False


def test_no_lm_head_keeps_the_output_layer_float(tmp_path):
    model = quantize_model(realistic(CONFIG), bits=4, lm_head=False)
    assert model.lm_head is None and model.config.tie_word_embeddings
    with torch.no_grad():
        before = model(ids())
    save_model(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(ids()), before)


def test_config_entries_that_cannot_load_are_refused():
    with torch.device("meta"):
        from qwen2.model import Qwen2

        model = Qwen2(CONFIG)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        apply_quantization(model, {"method": "weight_only", "bits": 2})
    with pytest.raises(ValueError, match="method"):
        apply_quantization(model, {"method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        apply_quantization(model, {"method": "weight_only", "bits": 8, "lm_head": True})
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantize_model(realistic(CONFIG), bits=8), bits=8)


# ---- qwen2 quantize ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_model(realistic(CONFIG), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    return path


@pytest.mark.parametrize("bits,extra", [(8, []), (4, ["--group-size", "64"])])
def test_qwen2_quantize_writes_what_load_model_reads(float_checkpoint, tmp_path, capsys, bits, extra):
    out = tmp_path / "q"
    assert (
        main(["quantize", "--model", str(float_checkpoint), "--out", str(out), "--bits", str(bits), *extra])
        == 0
    )
    assert str(out) in capsys.readouterr().out
    assert (out / "generation_config.json").is_file()  # side files travel with the weights
    group = 64 if bits == 4 else 128
    in_memory = quantize_model(load_model(float_checkpoint), bits=bits, group_size=group)
    loaded = load_model(out)
    assert loaded.config.quantization == in_memory.config.quantization
    with torch.no_grad():
        assert torch.equal(loaded(ids()), in_memory(ids()))


def test_qwen2_quantize_bad_input_is_one_line(float_checkpoint, tmp_path, capsys):
    def error(*argv):
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "no such model directory" in error(
        "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--bits", "8"
    )
    assert "does not divide" in error(
        "--model", str(float_checkpoint), "--out", str(tmp_path / "o"), "--bits", "4", "--group-size", "96"
    )
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not empty" in error(
        "--model", str(float_checkpoint), "--out", str(tmp_path / "full"), "--bits", "8"
    )
    with pytest.raises(SystemExit):  # argparse refuses --bits 3 itself (exit 2, usage line)
        main(["quantize", "--model", str(float_checkpoint), "--out", str(tmp_path / "o"), "--bits", "3"])
