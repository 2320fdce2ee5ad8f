"""Family adapters, loading any source into a safetensors directory, and parameter accounting."""

import pytest
import torch
from transformers import GPT2Config

from llmcarve.calibration import collect_channel_stats
from llmcarve.eval.accounting import parameter_report, unique_parameter_count
from llmcarve.models.adapters import Geometry, UnsupportedModelError, adapter_for
from llmcarve.models.loading import load_model, materialize
from tests.tiny import save_tiny, tiny_llama, tiny_qwen2
from tests.tolerance import assert_within_floor, float32_floor


@pytest.mark.parametrize("build", [lambda: tiny_llama(), lambda: tiny_llama(gqa=True), tiny_qwen2], ids=["llama-mha", "llama-gqa", "qwen2"])
def test_materialize_round_trip_keeps_logits(build, tmp_path):
    model = build()
    source = save_tiny(model, tmp_path / "source")
    out = materialize(source, tmp_path / "out")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    reloaded, tokenizer = load_model(out)
    ids = torch.tensor([tokenizer("the quick brown fox").input_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_unsupported_family_is_refused_before_loading_weights(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)  # a config, and no weights at all
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama.*qwen2"):
        materialize(str(tmp_path), tmp_path / "out")


def test_qwen2_adapter_knows_its_biases():
    assert adapter_for(tiny_qwen2().config).qkv_bias
    assert not adapter_for(tiny_llama().config).qkv_bias


def test_attention_weights_are_gqa_aware():
    mha, gqa = Geometry.from_config(tiny_llama().config), Geometry.from_config(tiny_llama(gqa=True).config)
    # hidden 32, head_dim 8: q and o have 4 heads; k and v have 4 (MHA) or 2 (GQA) heads.
    assert mha.attention_weights_per_layer == 32 * 8 * (4 + 4 + 4 + 4)
    assert gqa.attention_weights_per_layer == 32 * 8 * (4 + 2 + 2 + 4)


def test_parameter_report_of_dense_model():
    model = tiny_llama(gqa=True)
    report = parameter_report(model, context_len=16)
    stored = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    assert report["attention_mlp_params_active"] == stored == report["attention_mlp_params_dense"]
    assert report["active_ratio"] == 1.0
    # the tied LM head is not counted twice
    assert report["params_total"] == unique_parameter_count(model) < sum(p.numel() for p in model.parameters()) + model.lm_head.weight.numel()


def test_calibration_statistics_match_a_direct_computation():
    model = tiny_llama(gqa=True)
    blocks = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = collect_channel_stats(model, blocks, batch_size=2, progress=False)
    # recompute layer 0's MLP intermediate by hand from the layer's own input
    captured = {}
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=blocks)
    handle.remove()
    mlp = model.model.layers[0].mlp

    def intermediate_sq(m):
        x = captured["x"].to(m.up_proj.weight.dtype)
        return (m.act_fn(m.gate_proj(x)) * m.up_proj(x)).pow(2).sum((0, 1))

    floor = float32_floor(intermediate_sq, mlp)  # the direct computation's own rounding
    assert_within_floor(stats["layers.0.mlp.intermediate_sq"], intermediate_sq(mlp), floor, "collected vs direct intermediate_sq")
    assert stats["layers.1.attn.k_sq"].shape == (2, 8)  # GQA: 2 KV heads x head_dim 8
    assert stats["layers.1.attn.q_sq"].shape == (4, 8)
    assert int(stats["tokens"]) == 30
