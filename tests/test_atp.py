"""ATP on tiny random models: removal parity, the ratio constraint, the group lasso, resume, baselines."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from llmcarve.eval.recovery import add_recovery, recovered
from llmcarve.methods.atp.budget import kept_ratio
from llmcarve.methods.atp.convert import convert_atp, merged_model
from llmcarve.methods.atp.lora import group_norms, lora_parameters, pruned_slices
from llmcarve.methods.atp.trainer import ATPConfig, LoraRunConfig, train_atp, train_lora
from llmcarve.models.adapters import Geometry
from llmcarve.models.carved import CarvedForCausalLM
from llmcarve.params import DomainRecovery
from tests.tiny import tiny_llama, tiny_qwen2
from tests.tolerance import FLOAT32_EPS, MARGIN, float64_copy

FAMILIES = {"llama-mha": lambda: tiny_llama(), "llama-gqa": lambda: tiny_llama(gqa=True), "qwen2": tiny_qwen2}
CONFIG = ATPConfig(lora=LoraRunConfig(steps=40, batch_size=2, lr=5e-3, checkpoint_every=10), p=0.5, generator_lr=5e-2)


def blocks(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (24, 32), generator=torch.Generator().manual_seed(seed))


def train(make, config: ATPConfig, directory, **kwargs):
    data = blocks()
    return train_atp(make(), data[:16], data[16:], config, directory, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_atp_remove_save_load_matches_the_masked_model(family, tmp_path):
    result = train(FAMILIES[family], CONFIG, tmp_path / "ckpt")
    state = {name: value.detach().clone() for name, value in lora_parameters(result.model).items()}
    probe = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    compact, removal = convert_atp(FAMILIES[family](), state, result.masks, CONFIG.lora, probe)
    assert removal["removed_groups"] > 0
    # the report's max |compact - masked| against the same measure of the compact model's own
    # float32 rounding (its distance from a float64 copy) on the same probe
    with torch.no_grad():
        logits = compact(input_ids=probe).logits
        floor = (logits.double() - float64_copy(compact)(input_ids=probe).logits).abs().max().item()
    bound = MARGIN * max(floor, FLOAT32_EPS * logits.abs().max().item())
    assert removal["max_abs_logit_diff"] <= bound, (
        f"removal changed the logits by up to {removal['max_abs_logit_diff']:.2e}, above {MARGIN:g} x the compact "
        f"model's own float32 rounding {floor:.2e}: the compact model computes something else than the masked one"
    )
    compact.save_pretrained(tmp_path / "compact")
    loaded = CarvedForCausalLM.from_pretrained(tmp_path / "compact").eval()
    dense_params = sum(p.numel() for p in FAMILIES[family]().parameters())
    assert sum(p.numel() for p in loaded.parameters()) < dense_params
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, compact(input_ids=probe).logits)  # same weights, same code
    # widths are per layer and come from the decision
    assert loaded.config.mlp_dims == [int(m.mlp.sum()) for m in result.masks]
    assert loaded.config.qk_dims == [int(m.qk.sum()) for m in result.masks]


def test_ratio_constraint_pulls_the_learned_decision_to_p(tmp_path):
    config = dataclasses.replace(CONFIG, lora=dataclasses.replace(CONFIG.lora, steps=60), search_fraction=0.9)
    result = train(FAMILIES["llama-gqa"], config, tmp_path)
    search = [h for h in result.history if h["phase"] == "search"]
    assert search[0]["decision_ratio"] > 0.9  # the search starts dense (offset 3)
    late = [h["sampled_ratio"] for h in search[-10:]]
    assert sum(late) / len(late) == pytest.approx(0.5, abs=0.05)
    assert result.report["freeze"]["noise_free_ratio"] == pytest.approx(0.5, abs=0.05)
    assert result.report["kept_ratio"] == pytest.approx(0.5, abs=0.03)  # the frozen cut at p


def test_group_lasso_drives_pruned_lora_groups_to_zero(tmp_path):
    result = train(FAMILIES["llama-gqa"], CONFIG, tmp_path / "on")
    at_freeze = next(h for h in result.history if h["phase"] == "frozen")
    assert at_freeze["pruned_group_norm_max"] > 0.05  # LoRA did write into pruned groups while searching
    assert result.report["removed_group_norm_max"] == 0.0
    # without the final push they stay: the test above measures the push, not an artefact of training
    weak = dataclasses.replace(CONFIG, group_lasso_final=1e-6)
    assert train(FAMILIES["llama-gqa"], weak, tmp_path / "off").report["removed_group_norm_max"] > 0.05


def test_lora_update_masks_only_the_frozen_branch(tmp_path):
    """In the LoRA-update forward a pruned channel's LoRA rows still get gradients (the method's point)."""
    result = train(FAMILIES["llama-gqa"], dataclasses.replace(CONFIG, group_lasso_search=0.0), tmp_path)
    search_end = [h for h in result.history if h["phase"] == "search"][-1]
    assert search_end["pruned_group_norm_max"] > 0.05


def test_killed_run_resumes_to_the_same_model(tmp_path):
    whole = train(FAMILIES["llama-gqa"], CONFIG, tmp_path / "whole")
    train(FAMILIES["llama-gqa"], CONFIG, tmp_path / "resumed", stop_after=25)  # killed after checkpoint 20
    resumed = train(FAMILIES["llama-gqa"], CONFIG, tmp_path / "resumed")
    # same process, same inputs, a replay by design: bit for bit, as ToMoE's resume test demands
    assert [h["lora_ce"] for h in resumed.history] == [h["lora_ce"] for h in whole.history]
    for a, b in zip(whole.masks, resumed.masks):
        assert torch.equal(a.mlp, b.mlp) and torch.equal(a.qk, b.qk) and torch.equal(a.v, b.v)
    for (name, a), b in zip(lora_parameters(whole.model).items(), lora_parameters(resumed.model).values()):
        assert torch.equal(a, b), name


def test_plain_lora_lowers_the_training_loss(tmp_path):
    data = blocks()
    config = LoraRunConfig(steps=30, batch_size=2, lr=1e-2, dropout=0.0)
    tuned, history = train_lora(tiny_llama(gqa=True), data[:4], config, tmp_path)
    assert sum(h["lora_ce"] for h in history[-5:]) < sum(h["lora_ce"] for h in history[:5])
    assert type(merged_model(tuned)).__name__ == "LlamaForCausalLM"


def test_kept_ratio_counts_gqa_weights_exactly():
    model = tiny_llama(gqa=True)  # d 32, H 4, H_kv 2, hd 8, D_ff 64, 2 layers
    geometry = Geometry.from_config(model.config)
    from llmcarve.methods.atp.generator import LayerMasks

    def masks(qk, v, mlp):
        return [LayerMasks(torch.tensor([1.0] * qk + [0.0] * (8 - qk)), torch.tensor([1.0] * v + [0.0] * (8 - v)), torch.tensor([1.0] * mlp + [0.0] * (64 - mlp)))] * 2

    # per layer: q 32*4*qk + k 32*2*qk + v 32*2*v + o 32*4*v + MLP 3*32*mlp; dense = 32*6*16 + 3*32*64 = 9216
    assert kept_ratio(geometry, masks(8, 8, 64)).item() == pytest.approx(1.0)
    assert kept_ratio(geometry, masks(4, 2, 16)).item() == pytest.approx((32 * 6 * 6 + 3 * 32 * 16) / 9216)


def test_pruned_slices_name_exactly_the_groups_feeding_pruned_structures():
    from llmcarve.methods.atp.generator import LayerMasks
    from llmcarve.methods.atp.trainer import with_lora

    model = with_lora(tiny_llama(gqa=True), LoraRunConfig())
    keep_all = LayerMasks(torch.ones(8), torch.ones(8), torch.ones(64))
    drop = LayerMasks(torch.tensor([0.0, 1, 1, 1, 0, 1, 1, 1]), torch.tensor([0.0] + [1] * 7), torch.tensor([0.0] * 3 + [1] * 61))
    assert pruned_slices(model, [keep_all, keep_all]) == []
    slices = pruned_slices(model, [drop, keep_all])
    # one pair (2 dims) in 4 q heads + 2 k heads, one V dim in 2 kv heads and 4 o columns, 3 channels x 3
    assert len(group_norms(slices)) == 2 * 4 + 2 * 2 + 2 + 4 + 3 * 3


def test_recovered_performance_inverts_perplexity():
    spec = DomainRecovery(perplexity=["text"], tasks=["qa"])
    dense = {"ppl": {"text": {"ppl": 20.0}}, "domain": {"qa": {"acc": 0.5}}}
    pruned = {"ppl": {"text": {"ppl": 40.0}}, "domain": {"qa": {"acc": 0.4}}}
    assert recovered(pruned, dense, spec) == {"mean": pytest.approx(0.65), "per_metric": {"ppl:text": 0.5, "acc:qa": pytest.approx(0.8)}}
    models = {"dense": dense, "lora-med@1.0": dict(dense), "atp-med@0.6": dict(pruned), "tomoe@0.5": dict(pruned)}
    add_recovery(models, {"med": spec})
    assert set(models["atp-med@0.6"]["recovered"]) == {"vs_dense", "vs_lora"}
    assert "recovered" not in models["tomoe@0.5"]


def test_domain_blocks_keep_generator_and_lora_data_apart(tmp_path, monkeypatch):
    from llmcarve.params import ATPParams
    from stages import atp as stage

    monkeypatch.setattr(stage, "ARTIFACTS", tmp_path)
    (tmp_path / "data" / "medical").mkdir(parents=True)
    data = torch.arange(40 * 16).view(40, 16)  # every block distinct
    save_file({"blocks": data}, tmp_path / "data" / "medical" / "train_blocks.safetensors")
    lora, calibration = stage.domain_blocks(ATPParams(seq_len=16, calibration_blocks=8), "medical")
    assert len(lora) == 32 and len(calibration) == 8
    assert not {tuple(row.tolist()) for row in lora} & {tuple(row.tolist()) for row in calibration}
    with pytest.raises(ValueError, match="calibration_blocks"):
        stage.domain_blocks(ATPParams(seq_len=16, calibration_blocks=40), "medical")


def test_results_table_shows_recovered_performance_only_when_measured():
    from llmcarve.eval.report import markdown_table

    base = {"active_ratio": 1.0, "params_total": 1e8, "ppl": {"text": {"ppl": 20.0}}, "zero_shot": {}, "domain": {}}
    plain = markdown_table({"dense": base})
    assert "recovered" not in plain
    pruned = base | {"active_ratio": 0.6, "recovered": {"vs_dense": {"mean": 0.8125}}}
    table = markdown_table({"dense": base, "atp-med@0.6": pruned}).splitlines()
    assert "recovered vs dense | recovered vs LoRA-dense" in table[0]
    assert "| 0.812 |  |" in table[3]  # vs LoRA-dense left empty: no lora-med@1.0 was evaluated


def test_nan_stops_atp_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from llmcarve.methods.atp import trainer
    from llmcarve.methods.training import NonFiniteLossError

    config = ATPConfig(lora=LoraRunConfig(steps=6, batch_size=2, lr=5e-3, checkpoint_every=2), p=0.5, generator_lr=5e-2)
    train(FAMILIES["llama-gqa"], config, tmp_path, stop_after=2)
    saved = (tmp_path / "checkpoint.safetensors").read_bytes()
    real = trainer.lm_loss
    monkeypatch.setattr(trainer, "lm_loss", lambda model, batch: real(model, batch) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="'generator_ce' is nan at step 2; training stopped, the last good checkpoint is kept"):
        train(FAMILIES["llama-gqa"], config, tmp_path)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == saved


def test_a_lora_checkpoint_of_another_config_is_refused(tmp_path):
    from llmcarve.methods.training import CheckpointMismatchError

    data = blocks()
    config = LoraRunConfig(steps=4, batch_size=2, checkpoint_every=2)
    train_lora(tiny_llama(), data[:4], config, tmp_path / "lora")
    with pytest.raises(CheckpointMismatchError, match="another run"):
        train_lora(tiny_llama(), data[:4], dataclasses.replace(config, rank=4), tmp_path / "lora")
    train(FAMILIES["llama-gqa"], dataclasses.replace(CONFIG, lora=config), tmp_path / "atp")
    with pytest.raises(CheckpointMismatchError, match="another run"):
        train(FAMILIES["llama-gqa"], dataclasses.replace(CONFIG, lora=config, p=0.7), tmp_path / "atp")
