"""ONNX export: the graph matches PyTorch (logits and greedy generation through its cache) for dense,
carved static and ToMoE MoE models; every expert is in the MoE graph; router near-ties are reported,
not failed, while a changed model still fails; external data; no model code runs.

Each model is exported once per module (the dynamo export is most of the time here). Every tolerance
is a multiple of a floor measured in the same test: PyTorch's float32 against a float64 copy of the
same model on the same tokens.
"""

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmcarve.export import EXTERNAL_DATA_THRESHOLD_BYTES, OnnxCausalLM, check_parity, export_onnx
from llmcarve.export.compare import difference, difference_where
from llmcarve.export.experts import expert_parity, expert_weights_missing, router_choices
from llmcarve.export.onnx import as_model, parameter_bytes
from llmcarve.export.parity import logits_parity, torch_greedy
from llmcarve.export.routing import TIE_FACTOR, RoutingRecorder, float64_copy, moe_mlps, near_ties, pinned_forward
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import LayerPlan, carve
from llmcarve.params import ExportOnnxParams
from stages.export_onnx import failures
from tests.tiny import save_tiny, tiny_llama, tiny_qwen2

QUICK = dict(timing=False)  # parity without the speed section, which one test covers
# onnxruntime against PyTorch, in multiples of PyTorch's own float32 error against float64 (the floor).
# Two float32 engines, each about a floor from exact: measured 0.7 to 1.7 floors on these tiny models
# (logits, decode steps and routed experts, three seeds each); up to 3.7 on the SmolLM2 carvings in
# metrics/export_onnx.json. 8 floors leaves room over both, and stays far below what a wrong graph
# gives (a 0.1% weight change is over 100 floors, see the tests below).
FLOOR_MULTIPLE = 8
STAGE_MAX_REL_ERR = ExportOnnxParams().max_rel_err  # the stage's own tolerance (params.yaml)


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


TIED_LAYER, TIED_EXPERTS = 1, (0, 1)  # the last MoE layer of tiny_tomoe, two of its four experts


@torch.no_grad()
def router_floor(model, layer: int, ids: torch.Tensor) -> float:
    """PyTorch's float32 floor of one layer's router logits on `ids` (against float64, same routing)."""
    with RoutingRecorder(model) as routing:
        model(input_ids=ids)
    _, replayed = pinned_forward(float64_copy(model), ids, routing)
    return near_ties(routing.router_logits, replayed, tuple(ids.shape)).floors[layer]


def tiny_tomoe_graph_of_a_near_tie():
    """tiny_tomoe with expert 1's router row made expert 0's row times (1 + eta): where those two lead
    with a positive logit, this model, exported, prefers expert 1 by eta * logit, at most 8 float32
    floors. `exact_tie` gives PyTorch the exact tie (equal rows, so argmax takes expert 0): the two
    sides then route those tokens differently, as two float32 engines may at a real near-tie."""
    model = tiny_tomoe()
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(3))
    router = moe_mlps(model)[TIED_LAYER].router
    first, second = TIED_EXPERTS
    with torch.no_grad():
        router.weight[second] = router.weight[first]
        with RoutingRecorder(model) as routing:
            model(input_ids=ids)
        largest = float(routing.router_logits[TIED_LAYER][..., first].abs().max())
        eta = 8 * router_floor(model, TIED_LAYER, ids) / largest  # under TIE_FACTOR floors on every token
        router.weight[second] = router.weight[first] * (1 + eta)
    return model


def exact_tie(graph_model):
    """The PyTorch side of the planted near-tie: the two router rows equal, bit for bit."""
    model = copy.deepcopy(graph_model)
    router = moe_mlps(model)[TIED_LAYER].router
    with torch.no_grad():
        router.weight[TIED_EXPERTS[1]] = router.weight[TIED_EXPERTS[0]]
    return model


MODELS = {
    "llama-mha": lambda: lively(tiny_llama()),
    "llama-gqa": lambda: lively(tiny_llama(gqa=True)),
    "qwen2": lambda: lively(tiny_qwen2()),
    "carved-static": tiny_carved_static,
    "tomoe": tiny_tomoe,
    "tomoe-near-tie": tiny_tomoe_graph_of_a_near_tie,
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
    for entry in report["per_shape"]:
        assert entry["rel_err"] <= FLOOR_MULTIPLE * entry["pytorch_fp32_vs_fp64"]["rel_err"], entry
    assert report["greedy_match"], f"greedy tokens differ from step {report['greedy_first_mismatch']}"
    assert report["greedy_tokens"] == 32 and report["decode_steps_compared"] == 32
    # the decode steps' floor: PyTorch's step logits against float64 over the same tokens
    assert report["decode_max_abs_diff"] <= FLOOR_MULTIPLE * report["greedy_near_ties"]["next_token"]["floor"]
    assert [entry["shape"] for entry in report["per_shape"]] == [[1, 7], [2, 16], [3, 33]]
    assert failures({"model": report}, STAGE_MAX_REL_ERR) == {}
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
    """A 0.1% change to one weight after export: far above the stage's tolerance and the fp32 floor."""
    model, export = exported("llama-gqa")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.001)
    report = check_parity(changed, export, **QUICK)
    assert report["rel_err"] > 100 * report["pytorch_fp32_vs_fp64"]["rel_err"], report["per_shape"]
    assert "logits rel_err" in failures({"llama-gqa": report}, STAGE_MAX_REL_ERR)["llama-gqa"]
    assert failures({"llama-gqa": check_parity(model, export, **QUICK)}, STAGE_MAX_REL_ERR) == {}


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
        floor = difference(expected, float64_copy(model)(input_ids=ids).logits.numpy())["rel_err"]
    assert difference(np.concatenate([first, rest], axis=1), expected)["rel_err"] <= FLOOR_MULTIPLE * floor
    assert past[0].shape == (2, 2, 12, 4) and past[3].shape == (2, 2, 12, 3)  # per-layer K/V widths


@pytest.mark.slow  # shares the ToMoE export (about 20 s) with the next test; whichever runs first pays
def test_tomoe_export_matches_pytorch_and_keeps_its_routing(exported):
    model, export = exported("tomoe")
    assert model.config.moe_impl == "auto"  # exported through the masked path, then restored
    report = check_parity(model, export, **QUICK)
    assert_matches(report)
    assert report["moe_impl"] == "auto" and report["expert_weights_missing"] == []
    experts = report["expert_parity"]
    assert experts["unreached"] == [] and experts["near_ties"] == 0
    assert experts["max_rel_err"] <= FLOOR_MULTIPLE * report["pytorch_fp32_vs_fp64"]["rel_err"]


# ------------------------------------------------------------------------------------------------
# Every expert is in the MoE graph


@pytest.mark.slow  # shares the ToMoE export, see above
def test_every_expert_is_in_the_tomoe_graph(exported):
    model, export = exported("tomoe")
    # Weights: each expert's channels, router row and mask row are in the initializers.
    assert expert_weights_missing(model, export.path) == []

    # Behaviour: tokens that PyTorch routes to each expert give PyTorch's logits in onnxruntime.
    lm = OnnxCausalLM(export)
    result = expert_parity(model, lm)
    assert result["unreached"] == []
    reached = {(entry["layer"], entry["expert"]) for entry in result["checked"]}
    assert reached == {(0, e) for e in range(3)} | {(1, e) for e in range(4)}
    floor = logits_parity(model, lm, shapes=((4, 16),))["pytorch_fp32_vs_fp64"]["rel_err"]
    for entry in result["checked"]:
        assert entry["routed_tokens_compared"] > 0 and entry["rel_err"] <= FLOOR_MULTIPLE * floor, entry

    # The example input the exporter traced with (all zeros) reaches only some experts: the checks
    # above are what would notice a graph holding only those.
    traced_with = router_choices(model, torch.zeros(2, 3, dtype=torch.long))
    assert any(len(chosen.unique()) < model.config.num_experts[layer] for layer, chosen in traced_with.items())


# ------------------------------------------------------------------------------------------------
# Router near-ties: reported apart, never failed on; a changed model still fails


def test_a_near_tie_is_judged_by_the_measured_floor_and_ends_the_comparison_of_its_row():
    """Synthetic router logits [batch 2, length 4, 3 experts]; the float64 replay is off by 2**-20 (the
    floor). Powers of two keep every margin exact in float32."""
    floor = 2.0**-20
    recorded = torch.tensor([[[3.0, 1.0, 0.0]] * 4] * 2)
    recorded[1, 2] = torch.tensor([1.0, 1.0 - TIE_FACTOR * floor, 0.0])  # margin exactly at the threshold
    recorded[0, 3] = torch.tensor([1.0, 1.0 - (TIE_FACTOR + 1) * floor, 0.0])  # one floor clear of it
    replayed = recorded.double() + floor
    found = near_ties({5: recorded}, {5: replayed}, (2, 4))
    assert found.floors == {5: floor}
    assert [(tie.row, tie.position, tie.layer, tie.experts) for tie in found.ties] == [(1, 2, 5, (0, 1))]
    assert found.ties[0].threshold == found.ties[0].margin == TIE_FACTOR * floor
    # row 1 is compared before its near-tie only: from there on the engines may route differently
    assert found.compared().tolist() == [[True] * 4, [True, True, False, False]]

    expected = np.ones((2, 4, 5))
    actual = expected.copy()
    actual[1, 3] += 7.0  # after the near-tie: the other expert's output
    report = difference_where(actual, expected, found.compared())
    assert report["max_abs_diff"] == 0.0 and report["compared_tokens"] == 6 and report["tokens"] == 8
    assert report["excluded_max_abs_diff"] == 7.0  # kept, to show the tie went the other way
    actual[0, 1] += 1e-3  # before any near-tie: counted
    assert difference_where(actual, expected, found.compared())["max_abs_diff"] == pytest.approx(1e-3)


def test_failures_pass_near_ties_and_fail_what_no_near_tie_explains():
    fine = {"rel_err": 1e-6, "compared_tokens": 100, "greedy_match": True, "greedy_first_mismatch": None}
    assert failures({"m": fine}, 1e-4) == {}
    assert failures({"m": {**fine, "greedy_match": False, "greedy_first_mismatch": 5, "greedy_mismatch_near_tie": True}}, 1e-4) == {}
    wrong = failures({"m": {**fine, "greedy_match": False, "greedy_first_mismatch": 5, "greedy_mismatch_near_tie": False}}, 1e-4)
    assert "greedy tokens differ from token 5" in wrong["m"]
    assert "no logits compared" in failures({"m": {**fine, "rel_err": float("nan"), "compared_tokens": 0}}, 1e-4)["m"]
    experts = {"checked": [{"layer": 3, "expert": 2, "rel_err": 2e-4, "max_abs_diff": 0.3}], "max_rel_err": 2e-4}
    problem = failures({"m": {**fine, "expert_parity": experts, "expert_weights_missing": []}}, 1e-4)["m"]
    assert "routed-expert rel_err" in problem and "layer 3 expert 2" in problem


@pytest.mark.slow  # one more ToMoE export (about 20 s) and three parity checks
def test_a_planted_near_tie_is_reported_not_failed_and_a_changed_model_still_fails(exported):
    """PyTorch's last router has two equal rows (margin 0: it takes expert 0), the exported graph the
    same rows a few float32 floors apart (it takes expert 1): the two sides route those tokens
    differently, as two float32 engines may at any near-tie."""
    graph_model, export = exported("tomoe-near-tie")
    model = exact_tie(graph_model)
    report = check_parity(model, export, **QUICK)
    assert failures({"tied": report}, STAGE_MAX_REL_ERR) == {}, report["per_shape"]

    ties = [tie for entry in report["per_shape"] for tie in entry["near_tie_tokens"]]
    assert ties and {(tie["layer"], tie["margin"], tuple(tie["experts"])) for tie in ties} == {(TIED_LAYER, 0.0, TIED_EXPERTS)}
    assert report["near_ties"] == len(ties) and 0 < report["compared_tokens"] < report["tokens"]
    # the planted ties did go the other way: past them the logits differ far beyond rounding
    excluded = max(entry.get("excluded_max_abs_diff", 0.0) for entry in report["per_shape"])
    assert excluded > 1000 * report["max_abs_diff"]
    for entry in report["per_shape"]:
        if entry["compared_tokens"]:  # a row that starts with a tie has nothing before it to compare
            assert entry["rel_err"] <= FLOOR_MULTIPLE * entry["pytorch_fp32_vs_fp64"]["rel_err"], entry
    experts = report["expert_parity"]
    assert experts["near_ties"] > 0 and experts["checked"]
    assert experts["max_rel_err"] <= FLOOR_MULTIPLE * report["pytorch_fp32_vs_fp64"]["rel_err"]
    assert report["greedy_match"] or report["greedy_mismatch_near_tie"]
    json.dumps(report)

    # A real difference is not a near-tie: the positions before the ties still show it.
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(1.001)
    problems = failures({"changed": check_parity(changed, export, **QUICK)}, STAGE_MAX_REL_ERR)["changed"]
    assert "logits rel_err" in problems and "routed-expert rel_err" in problems


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
    assert report["rel_err"] <= FLOOR_MULTIPLE * report["pytorch_fp32_vs_fp64"]["rel_err"] and report["greedy_match"]

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
