"""Stage remove: turn every pruning decision into a model that loads with from_pretrained.

ToMoE heads become a deterministic MoE model; the static baseline is chosen from the calibration
statistics at the same budgets and physically sliced; ATP's LoRA is merged and its decisions sliced
(checked against the masked model on random tokens, the dropped LoRA groups' norms reported). Writes artifacts/remove/<name>/ (safetensors
HF directories, class CarvedForCausalLM) and metrics/remove.json (parameters and active ratios).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from llmcarve.eval.accounting import parameter_report
from llmcarve.io import atomic_directory, ensure_free_space, write_json
from llmcarve.methods.atp.convert import convert_atp
from llmcarve.methods.atp.generator import masks_from_state
from llmcarve.methods.atp.trainer import LoraRunConfig
from llmcarve.methods.baselines.static import prune_static
from llmcarve.methods.tomoe.convert import convert_to_moe
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.models.adapters import Geometry
from llmcarve.models.loading import load_model, saved_model_bytes
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "remove"


def load_heads(directory, geometry: Geometry, num_experts: int) -> tuple[ToMoEHeads, dict]:
    heads = ToMoEHeads(geometry, num_experts)
    heads.load_state_dict(load_file(directory / "heads.safetensors"))
    return heads, json.loads((directory / "training.json").read_text())


def convert_atp_run(directory, vocab_size: int, seed: int):
    """Load the dense model afresh (merging consumes it) and convert one atp-<domain>@p run."""
    dense, _ = load_model(ARTIFACTS / "model")
    training = json.loads((directory / "training.json").read_text())
    probe = torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed))
    return convert_atp(
        dense,
        load_file(directory / "lora.safetensors"),
        masks_from_state(load_file(directory / "masks.safetensors")),
        LoraRunConfig(**training["config"]["lora"]),
        probe,
    )


def run(params: Params) -> None:
    with stage_run("remove", {"tomoe": params.tomoe.model_dump(), "static": params.static.model_dump(), "atp": params.atp.model_dump()}) as tracker:
        dense, tokenizer = load_model(ARTIFACTS / "model")
        geometry = Geometry.from_config(dense.config)
        stats = load_file(ARTIFACTS / "calibration" / "stats.safetensors")
        carved = {}
        for p in params.tomoe.budgets:
            heads, training = load_heads(ARTIFACTS / "tomoe" / f"tomoe@{p:g}", geometry, params.tomoe.num_experts)
            carved[f"tomoe@{p:g}"] = convert_to_moe(dense, heads, params.tomoe.offset, training["v_topk"])
        for p in params.static.budgets:
            carved[f"static@{p:g}"] = prune_static(dense, stats, p)
        removal = {}
        for domain in params.atp.domains:
            for p in params.atp.budgets:
                name = f"atp-{domain}@{p:g}"
                carved[name], removal[name] = convert_atp_run(ARTIFACTS / "atp" / name, dense.config.vocab_size, params.seed)
        # all models at once, before the first is written: the old outputs stay until the rename
        ensure_free_space(OUT, sum(saved_model_bytes(m) for m in carved.values()), f"the carved models ({', '.join(carved)})")
        report = {}
        with atomic_directory(OUT) as staging:
            for name, model in carved.items():
                model.save_pretrained(staging / name)
                tokenizer.save_pretrained(staging / name)
                report[name] = parameter_report(model, context_len=512) | ({"removal": removal[name]} if name in removal else {})
        write_json(METRICS / "remove.json", report)
        tracker.log_metrics(report)


if __name__ == "__main__":
    main(run, __doc__)
