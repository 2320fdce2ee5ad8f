"""ToMoE training on tiny models: budget, resume, teacher pass, loss terms, numerical faults."""

import pytest
import torch

from llmcarve.methods.tomoe import losses
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.masking import MaskSettings, ToMoEMasker, cap_top_k
from llmcarve.methods.tomoe.trainer import NonFiniteLossError, ToMoEConfig, train_tomoe
from llmcarve.models.adapters import Geometry
from tests.tiny import tiny_llama, tiny_qwen2
from tests.tolerance import assert_within_floor, float32_floor, nudge_one_ulp, relative_error

BLOCKS = torch.randint(3, 250, (16, 24), generator=torch.Generator().manual_seed(0))
FAST = dict(steps=60, lr=2e-2, checkpoint_every=30, num_experts=4)


def deterministic_ratio(model, result) -> float:
    from llmcarve.methods.tomoe.budget import active_ratio

    masker = ToMoEMasker(model, result.heads, MaskSettings(v_topk=result.v_topk)).attach()
    with torch.no_grad():
        masker.step(None)
        model(input_ids=BLOCKS[:4])
        ratio = active_ratio(masker.geometry, masker.layers).item()
    masker.detach()
    return ratio


@pytest.mark.parametrize("build", [lambda: tiny_llama(gqa=True), tiny_qwen2], ids=["llama-gqa", "qwen2"])
def test_training_drives_the_active_ratio_to_the_budget(build, tmp_path):
    model = build()
    result = train_tomoe(model, BLOCKS, ToMoEConfig(p=0.5, **FAST), tmp_path)
    assert result.history[0]["ratio"] > 0.95, "training must start (nearly) dense"
    assert abs(result.history[-1]["ratio"] - 0.5) < 0.06
    assert abs(deterministic_ratio(model, result) - 0.5) < 0.1


def test_resume_after_interruption_gives_the_same_heads(tmp_path):
    config = ToMoEConfig(p=0.6, steps=20, checkpoint_every=5, lr=1e-2, num_experts=4)
    straight = train_tomoe(tiny_llama(), BLOCKS, config, tmp_path / "straight")
    # "killed" after 7 steps: the checkpoint holds step 5; steps 5 and 6 are replayed on resume
    train_tomoe(tiny_llama(), BLOCKS, config, tmp_path / "resumed", stop_after=7)
    resumed = train_tomoe(tiny_llama(), BLOCKS, config, tmp_path / "resumed")
    # the log continues the checkpoint's: the resumed run reports every step, each exactly once
    assert [entry["step"] for entry in resumed.history] == list(range(20))
    assert resumed.history == straight.history
    for name, value in straight.heads.state_dict().items():
        assert torch.equal(value, resumed.heads.state_dict()[name]), name
    assert straight.v_topk == resumed.v_topk


def test_teacher_pass_and_fresh_heads_leave_the_model_unchanged():
    model = tiny_llama(gqa=True)
    with torch.no_grad():
        plain = model(input_ids=BLOCKS[:2]).logits
    floor = float32_floor(lambda m: m(input_ids=BLOCKS[:2]).logits, model)
    masker = ToMoEMasker(model, ToMoEHeads(Geometry.from_config(model.config), 4), MaskSettings()).attach()
    with torch.no_grad():
        masker.step(None)
        with masker.disabled():
            assert torch.equal(model(input_ids=BLOCKS[:2]).logits, plain)
        # the +3 offset starts every mask at one, so the deterministic student is the teacher
        assert_within_floor(model(input_ids=BLOCKS[:2]).logits, plain, floor, "deterministic student vs teacher")
    masker.detach()


def test_masks_act_where_they_should():
    model = tiny_llama(gqa=True)
    heads = ToMoEHeads(Geometry.from_config(model.config), 4)
    masker = ToMoEMasker(model, heads, MaskSettings()).attach()
    with torch.no_grad():
        heads.attention[0].decoder.linear.weight.zero_()
        heads.attention[0].decoder.linear.weight[8 + 1].fill_(-100.0)  # Q/K pair 1 -> dims 1 and 5 off
        captured = {}
        model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda _m, _i, out: captured.setdefault("k", out))
        masker.step(None)
        model(input_ids=BLOCKS[:1])
    k = captured["k"].view(1, 24, 2, 8)
    assert (k[..., [1, 5]] == 0).all() and (k[..., [0, 2, 3, 4, 6, 7]] != 0).all()
    masker.detach()


def test_loss_terms():
    assert losses.union_coverage(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.union_coverage(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() > 0.6
    uniform = torch.eye(4).repeat(5, 1)
    assert losses.load_balance(uniform).item() == pytest.approx(0.25)
    assert losses.load_balance(torch.eye(4)[[0] * 20]).item() == pytest.approx(1.0)
    assert losses.log_ratio_penalty(torch.tensor(0.5), 0.5).item() == pytest.approx(0.0)
    # two-sided: halving and doubling cost the same (up to the tiny c that keeps the log finite)
    assert losses.log_ratio_penalty(torch.tensor(0.25), 0.5).item() == pytest.approx(losses.log_ratio_penalty(torch.tensor(1.0), 0.5).item(), abs=2e-3)
    logits = torch.randn(3, 7)
    assert losses.distillation(logits, logits) <= losses.distillation(torch.randn(3, 7), logits)


def test_top_k_cap_keeps_the_largest_kept_logits():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    logits = torch.tensor([[0.5, 2.0, 9.0, 1.0]])
    assert cap_top_k(mask, logits, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_nan_loss_stops_with_step_and_part_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = ToMoEConfig(p=0.5, steps=6, checkpoint_every=2, num_experts=4)
    train_tomoe(tiny_llama(), BLOCKS, config, tmp_path, stop_after=2)
    saved = (tmp_path / "checkpoint.safetensors").read_bytes()
    real = losses.distillation
    monkeypatch.setattr(losses, "distillation", lambda s, t: real(s, t) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="'kd' is nan at step 2"):
        train_tomoe(tiny_llama(), BLOCKS, config, tmp_path)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == saved


@pytest.mark.parametrize("build", [lambda: tiny_llama(), lambda: tiny_llama(gqa=True), tiny_qwen2], ids=["llama-mha", "llama-gqa", "qwen2"])
def test_train_convert_save_load_keeps_the_masked_logits(build, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmcarve.eval.accounting import parameter_report
    from llmcarve.methods.tomoe.convert import convert_to_moe
    from llmcarve.models.carved import CarvedForCausalLM

    model = build()
    config = ToMoEConfig(p=0.5, **FAST)
    result = train_tomoe(model, BLOCKS, config, tmp_path / "ckpt")
    masker = ToMoEMasker(model, result.heads, MaskSettings(config.temperature, config.offset, v_topk=result.v_topk)).attach()
    with torch.no_grad():
        masker.step(None)
        masked = model(input_ids=BLOCKS[:3]).logits
    masker.detach()

    moe = convert_to_moe(model, result.heads, config.offset, result.v_topk)
    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(loaded, CarvedForCausalLM)
    floor = float32_floor(lambda m: m(input_ids=BLOCKS[:3]).logits, moe)
    with torch.no_grad():
        assert_within_floor(moe(input_ids=BLOCKS[:3]).logits, masked, floor, "converted MoE vs masked model logits")
        assert_within_floor(loaded(input_ids=BLOCKS[:3]).logits, masked, floor, "reloaded MoE vs masked model logits")
    # The carved model counts its own weights (widest expert, V cap, GQA-aware); the trained budget
    # must hold there, or the training-time accounting is wrong.
    measured = parameter_report(loaded, context_len=24)["active_ratio"]
    assert abs(measured - config.p) < 0.1, measured
    assert loaded.config.num_experts == [4, 4]


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_budget_counts_exactly_the_weights_a_token_uses(gqa):
    """The differentiable budget against a count read off the real projection shapes, so a formula
    that, say, counted K/V with the query heads under GQA fails here."""
    from llmcarve.methods.tomoe.budget import active_ratio
    from llmcarve.methods.tomoe.masking import LayerDecisions

    model = tiny_llama(gqa=gqa)
    geometry = Geometry.from_config(model.config)
    qk = torch.tensor([1.0, 0.0, 1.0, 0.0] * 2)  # 4 of 8 Q/K dims
    v = torch.zeros(1, 3, 8)
    for token, width in enumerate((2, 5, 3)):  # the widest token uses 5 V dims
        v[0, token, :width] = 1
    experts = torch.zeros(4, 64)
    for expert, width in enumerate((10, 20, 7, 1)):  # the widest expert uses 20 channels
        experts[expert, :width] = 1
    decisions = [LayerDecisions(qk_mask=qk, v_mask=v, expert_masks=experts) for _ in range(geometry.num_layers)]

    expected = dense = 0
    for layer in model.model.layers:
        attention, mlp, hd = layer.self_attn, layer.mlp, geometry.head_dim
        q_heads, kv_heads, d = attention.q_proj.out_features // hd, attention.k_proj.out_features // hd, attention.q_proj.in_features
        expected += d * (q_heads * 4 + kv_heads * 4 + kv_heads * 5 + q_heads * 5) + 3 * d * 20
        dense += sum(p.weight.numel() for p in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert active_ratio(geometry, decisions).item() == pytest.approx(expected / dense, rel=1e-6)


def test_the_hooked_student_compiles_as_one_graph_and_computes_what_eager_does():
    """The trainer compiles the masked student on a GPU (hooks and all). Here torch.compile's
    aot_eager backend (no C++ toolchain needed) with fullgraph=True: a hook that broke the graph (a
    generator inside it, a host sync) fails, and the noisy masks, logits and head gradients must
    equal the eager ones."""
    from llmcarve.methods.tomoe.budget import active_ratio

    torch._dynamo.reset()
    model = tiny_llama(gqa=True)
    heads = ToMoEHeads(Geometry.from_config(model.config), 4)
    masker = ToMoEMasker(model, heads, MaskSettings()).attach()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    runs = []
    for student, nudged in ((model, False), (compiled, False), (model, True)):
        if nudged:  # the floor: the eager step again, from heads one rounding (ulp) away
            nudge_one_ulp(heads.parameters(), seed=0)
        heads.zero_grad(set_to_none=True)
        masker.step(torch.Generator().manual_seed(3), BLOCKS[:2].shape)
        logits = student(input_ids=BLOCKS[:2]).logits
        (logits.float().pow(2).mean() + active_ratio(masker.geometry, masker.layers)).backward()
        runs.append({
            "logits": logits.detach(),
            "token masks": torch.stack([d.token_mlp_mask.detach() for d in masker.layers]),
            "v masks": torch.stack([d.v_mask.detach() for d in masker.layers]),
            "gradients": torch.cat([p.grad.flatten() for p in heads.parameters() if p.grad is not None]),
        })
    masker.detach()
    eager, traced, twin = runs
    assert eager["token masks"].min() == 0, "the test needs masks that drop channels"
    # decisions exactly (straight-through values are 0 or 1 up to an ulp); logits and gradients within
    # the rounding spread, measured as how far they move when the heads move by one rounding
    for name in ("token masks", "v masks"):
        assert torch.equal(traced[name] > 0.5, eager[name] > 0.5), name
    for name in ("logits", "gradients"):
        assert_within_floor(traced[name], eager[name], relative_error(twin[name], eager[name]), f"compiled vs eager {name}")


def test_a_checkpoint_of_another_config_is_refused_and_a_resume_logs_once(tmp_path, caplog):
    import logging

    from llmcarve.methods.training import CheckpointMismatchError

    config = ToMoEConfig(p=0.5, steps=4, checkpoint_every=2, num_experts=4)
    train_tomoe(tiny_llama(), BLOCKS, config, tmp_path, stop_after=2)
    with pytest.raises(CheckpointMismatchError, match="another run"):
        train_tomoe(tiny_llama(), BLOCKS, ToMoEConfig(p=0.5, steps=4, checkpoint_every=2, num_experts=4, lr=2e-3), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="another run"):
        train_tomoe(tiny_llama(), BLOCKS + 1, config, tmp_path)
    caplog.set_level(logging.INFO)  # every logger: the resume must be told once, whoever tells it
    train_tomoe(tiny_llama(), BLOCKS, config, tmp_path)
    resumes = [record.getMessage() for record in caplog.records if "resumed from checkpoint" in record.getMessage()]
    assert resumes == [f"resumed from checkpoint {tmp_path / 'checkpoint.safetensors'} at step 2"]
