"""Data-parallel ToMoE training (torchrun, gloo on the CPU) ends with the masks one process gets."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.masking import MaskSettings, ToMoEMasker
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe
from llmcarve.models.adapters import Geometry
from tests.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = torch.randint(3, 250, (16, 24), generator=torch.Generator().manual_seed(1))
# batch 4 over 2 processes; a high lr moves the masks within a few steps, so a wrong split shows
CONFIG = ToMoEConfig(p=0.5, steps=8, batch_size=4, lr=3e-2, num_experts=4, checkpoint_every=4)


def model():
    return tiny_llama(gqa=True)


def deterministic_masks(heads) -> dict[str, torch.Tensor]:
    """The converted model's decisions: Q/K masks, expert masks, and V masks/routes on fixed tokens."""
    tiny = model()
    masker = ToMoEMasker(tiny, heads, MaskSettings()).attach()
    with torch.no_grad():
        masker.step(None)
        tiny(input_ids=BLOCKS[:2])
    masker.detach()
    masks = {}
    for index, layer in enumerate(masker.layers):
        masks |= {f"{index}.qk": layer.qk_mask, f"{index}.experts": layer.expert_masks, f"{index}.v": layer.v_mask, f"{index}.route": layer.route}
    # straight-through values are 1 + (soft - soft) up to an ulp; the decision is the binary part
    return {name: mask > 0.5 for name, mask in masks.items()}


def test_two_gloo_processes_train_the_masks_of_one_process(tmp_path):
    single = train_tomoe(model(), BLOCKS, CONFIG, tmp_path / "single")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "ddp_tomoe.py"), str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    heads = ToMoEHeads(Geometry.from_config(model().config), CONFIG.num_experts, seed=CONFIG.seed)
    heads.load_state_dict(load_file(tmp_path / "ddp" / "heads.safetensors"))

    parallel = deterministic_masks(heads)
    for name, mask in deterministic_masks(single.heads).items():
        assert torch.equal(mask, parallel[name]), name
    for name, value in single.heads.state_dict().items():
        torch.testing.assert_close(heads.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log["v_topk"] == single.v_topk
    for ours, theirs in zip(log["history"], single.history, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert abs(ours[key] - theirs[key]) <= 1e-5 * max(1.0, abs(theirs[key])), (ours["step"], key)
    # the masks moved during training: the test compares decisions, not two untouched initialisations
    assert single.history[-1]["ratio"] < 0.9
