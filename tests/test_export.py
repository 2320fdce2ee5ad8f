"""ONNX export: the graph matches PyTorch (logits and greedy generation through its cache) for dense,
carved static and ToMoE MoE models; every expert is in the MoE graph; external data; no model code runs.

Each model is exported once per module (the dynamo export is most of the time here).
"""

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmcarve.export import EXTERNAL_DATA_THRESHOLD_BYTES, OnnxCausalLM, check_parity, export_onnx
from llmcarve.export.compare import difference
from llmcarve.export.experts import expert_parity, expert_weights_missing, router_choices
from llmcarve.export.onnx import as_model, parameter_bytes
from llmcarve.export.parity import torch_greedy
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import LayerPlan, carve
from tests.tiny import save_tiny, tiny_llama, tiny_qwen2

QUICK = dict(timing=False)  # parity without the speed section, which one test covers


# ------------------------------------------------------------------------------------------------
# Tiny models: lively dense ones, and carved ones with different widths in every layer


@torch.no_grad()
def lively(model, std: float = 0.3, seed: int = 0):
    """Redraw every weight matrix at std 0.3 (embeddings and projections).

    At transformers' init (std 0.02) attention and MLPs barely move the residual stream, and with
    tied embeddings a tiny model greedily repeats its last token whatever came before: a graph that
    ignored its past would still "match" over 32 tokens. At 0.3 the continuation depends on context.
    """
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.ndim == 2:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def layer_plan(geometry: Geometry, seed: int, qk_pairs: int, v: int, mlp: int, experts: int = 0, v_active: int | None = None) -> LayerPlan:
    """Random kept units; with experts, a random top-1 router, expert channel subsets and a dynamic V mask."""
    generator = torch.Generator().manual_seed(seed)
    half, d = geometry.head_dim // 2, geometry.hidden_size

    def subset(size, keep):
        return torch.randperm(size, generator=generator)[:keep].sort().values

    pairs = subset(half, qk_pairs)
    plan = LayerPlan(torch.cat([pairs, pairs + half]), subset(geometry.head_dim, v), subset(geometry.intermediate_size, mlp))
    if experts:
        plan.expert_mask = torch.rand(experts, mlp, generator=generator) < 0.5
        plan.router_weight = torch.randn(experts, d, generator=generator)
        plan.v_router = {
            "router": torch.randn(6, d, generator=generator),
            "state": torch.randn(6, generator=generator),
            "norm_weight": 1 + 0.1 * torch.randn(6, generator=generator),
            "norm_bias": 0.1 * torch.randn(6, generator=generator),
            "decoder": torch.randn(v, 6, generator=generator),
            "offset": 0.0,  # about half of the V dims on per token
        }
        plan.v_active = v_active
    return plan


def tiny_carved_static():
    dense = lively(tiny_llama(gqa=True))
    geometry = Geometry.from_config(dense.config)
    return carve(dense, [layer_plan(geometry, 0, qk_pairs=2, v=5, mlp=40), layer_plan(geometry, 1, qk_pairs=3, v=3, mlp=24)])


def tiny_tomoe():
    dense = lively(tiny_qwen2())
    geometry = Geometry.from_config(dense.config)
    plans = [
        layer_plan(geometry, 0, qk_pairs=2, v=6, mlp=40, experts=3),
        layer_plan(geometry, 1, qk_pairs=3, v=5, mlp=32, experts=4, v_active=3),  # V capped by top-k
    ]
    model = carve(dense, plans)
    # the default MoE path: sorted groups and shape-picked kernels that the export must not trace, and
    # whose routing checks (expert_parity) must still see every token's expert
    assert model.config.moe_impl == "auto"
    return model


MODELS = {
    "llama-mha": lambda: lively(tiny_llama()),
    "llama-gqa": lambda: lively(tiny_llama(gqa=True)),
    "qwen2": lambda: lively(tiny_qwen2()),
    "carved-static": tiny_carved_static,
    "tomoe": tiny_tomoe,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, export), each exported at most once in this module."""
    done = {}

    def get(kind):
        if kind not in done:
            model = MODELS[kind]()
            prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
            assert len(torch_greedy(model, prompt, 32)[0].unique()) >= 8, "greedy parity needs a context-dependent model"
            done[kind] = model, export_onnx(model, tmp_path_factory.mktemp(kind) / "onnx")
        return done[kind]

    return get


def assert_matches(report: dict) -> None:
    assert report["rel_err"] <= 1e-4, report["per_shape"]
    assert report["greedy_match"], f"greedy tokens differ from step {report['greedy_first_mismatch']}"
    assert report["greedy_tokens"] == 32
    assert report["decode_rel_err"] <= 1e-4
    assert [entry["shape"] for entry in report["per_shape"]] == [[1, 7], [2, 16], [3, 33]]
    json.dumps(report)  # becomes metrics/export_onnx.json


# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "qwen2"])
def test_dense_export_matches_pytorch(exported, kind):
    model, export = exported(kind)
    report = check_parity(model, export, **QUICK)
    assert_matches(report)
    assert report["file_bytes"] == export.path.stat().st_size and not report["external_data"]
    assert not list(export.directory.glob("*.data"))  # under the threshold: one self-contained file


def test_parity_sees_a_graph_that_no_longer_matches_its_model(exported):
    """A 0.1% change to one weight after export: far above the tolerance, far above the fp32 floor."""
    from stages.export_onnx import failures

    model, export = exported("llama-gqa")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    report = check_parity(changed, export, **QUICK)
    assert 1e-4 < report["rel_err"] < 1e-2, report["per_shape"]
    assert report["pytorch_fp32_vs_fp64"]["rel_err"] < 1e-5  # the rounding floor of this tiny model
    assert "logits rel_err" in failures({"llama-gqa": report}, max_rel_err=1e-4)["llama-gqa"]
    assert failures({"llama-gqa": check_parity(model, export, **QUICK)}, max_rel_err=1e-4) == {}


def test_relative_error_is_in_norm_and_the_peak_is_kept_beside_it():
    expected = np.array([[3.0, -4.0], [0.0, 0.0]])
    report = difference(expected + np.array([[0.0, 0.5], [0.0, 0.0]]), expected)
    assert report == {"max_abs_diff": 0.5, "rel_err": 0.1, "peak_rel_err": 0.125}


def test_speed_section_compares_onnxruntime_with_pytorch(exported):
    model, export = exported("llama-gqa")
    report = check_parity(model, export, shapes=((1, 4),), new_tokens=4, prefill_tokens=16, repeats=1)
    speed = report["speed"]
    for engine in ("onnxruntime", "pytorch"):
        assert set(speed[engine]) == {"prefill_latency_ms", "prefill_tokens_per_s", "decode_latency_ms_per_token", "decode_tokens_per_s"}
        timings = speed[engine]
        assert all(value > 0 for value in timings.values())
        # rates and latencies are two views of the same measured time
        assert timings["prefill_tokens_per_s"] * timings["prefill_latency_ms"] / 1000 == pytest.approx(16)
        assert timings["decode_tokens_per_s"] * timings["decode_latency_ms_per_token"] / 1000 == pytest.approx(1)
    assert speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0 and speed["decode_tokens"] == 4


@pytest.mark.slow  # about 20 s on the 2-core machine, nearly all of it the dynamo export
def test_carved_static_export_matches_pytorch(exported):
    model, export = exported("carved-static")
    assert [(layer.key_dim, layer.value_dim) for layer in export.layers] == [(4, 5), (6, 3)]
    assert_matches(check_parity(model, export, **QUICK))

    # A past of length > 0 with several new tokens at once: the graph is not limited to one.
    lm = OnnxCausalLM(export)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    first, past = lm(ids[:, :5].numpy())
    rest, past = lm(ids[:, 5:].numpy(), past)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), expected, atol=1e-5, rtol=0)
    assert past[0].shape == (2, 2, 12, 4) and past[3].shape == (2, 2, 12, 3)  # per-layer K/V widths


@pytest.mark.slow  # shares the ToMoE export (about 20 s) with the next test; whichever runs first pays
def test_tomoe_export_matches_pytorch_and_keeps_its_routing(exported):
    model, export = exported("tomoe")
    assert model.config.moe_impl == "auto"  # exported through the masked path, then restored
    report = check_parity(model, export, **QUICK)
    assert_matches(report)
    assert report["moe_impl"] == "auto" and report["expert_weights_missing"] == []
    assert report["expert_parity"]["unreached"] == [] and report["expert_parity"]["max_rel_err"] <= 1e-4


# ------------------------------------------------------------------------------------------------
# Every expert is in the MoE graph


@pytest.mark.slow  # shares the ToMoE export, see above
def test_every_expert_is_in_the_tomoe_graph(exported):
    model, export = exported("tomoe")
    # Weights: each expert's channels, router row and mask row are in the initializers.
    assert expert_weights_missing(model, export.path) == []

    # Behaviour: tokens that PyTorch routes to each expert give PyTorch's logits in onnxruntime.
    result = expert_parity(model, OnnxCausalLM(export))
    assert result["unreached"] == []
    reached = {(entry["layer"], entry["expert"]) for entry in result["checked"]}
    assert reached == {(0, e) for e in range(3)} | {(1, e) for e in range(4)}
    for entry in result["checked"]:
        assert entry["rel_err"] <= 1e-4, entry

    # The example input the exporter traced with (all zeros) reaches only some experts: the checks
    # above are what would notice a graph holding only those.
    traced_with = router_choices(model, torch.zeros(2, 3, dtype=torch.long))
    assert any(len(chosen.unique()) < model.config.num_experts[layer] for layer, chosen in traced_with.items())


# ------------------------------------------------------------------------------------------------
# External data, loading, dtype


def test_external_data_is_used_over_the_threshold(exported, tmp_path):
    model = lively(tiny_llama(gqa=True))
    weights = parameter_bytes(model)
    assert weights < EXTERNAL_DATA_THRESHOLD_BYTES
    # from a saved directory, the way the export stage gets its model
    export = export_onnx(save_tiny(model, tmp_path / "model"), tmp_path / "onnx", external_data_threshold_bytes=weights - 1)
    data = tmp_path / "onnx" / "model.onnx.data"
    assert export.external_data and data.is_file()
    # the weights live in the side file; only tensors of a few bytes (shapes, scalars) stay inline
    inline = sum(len(tensor.raw_data) for tensor in onnx.load(str(export.path), load_external_data=False).graph.initializer)
    assert data.stat().st_size >= 0.9 * weights and inline < weights / 50
    report = check_parity(model, tmp_path / "onnx", shapes=((2, 9),), new_tokens=32, timing=False)  # reloads the manifest
    assert report["external_data"] and report["file_bytes"] == export.path.stat().st_size + data.stat().st_size
    assert report["rel_err"] <= 1e-4 and report["greedy_match"]

    _, below = exported("llama-gqa")  # the same model at the default threshold: one file
    assert not below.external_data and not list(below.directory.glob("*.data"))


def test_loading_a_directory_runs_no_code_from_it(tmp_path):
    marker = tmp_path / "code-ran"
    directory = Path(save_tiny(tiny_llama(), tmp_path / "model"))
    (directory / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    model = as_model(directory)
    assert not marker.exists()
    assert type(model).__name__ == "LlamaForCausalLM"  # the built-in class: auto_map ignored

    config["model_type"] = "evil"  # an unknown family: refused rather than imported
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        as_model(directory)
    assert not marker.exists()


def test_non_float32_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_llama().to(torch.bfloat16), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
