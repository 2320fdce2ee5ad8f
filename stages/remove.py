"""Stage remove: turn every pruning decision into a model that loads with from_pretrained.

ToMoE heads become a deterministic MoE model; the static baseline is chosen from the calibration
statistics at the same budgets and physically sliced; ATP's LoRA is merged and its decisions sliced
(checked against the masked model on random tokens, the dropped LoRA groups' norms reported). Writes artifacts/remove/<name>/ (safetensors
HF directories, class CarvedForCausalLM) and metrics/remove.json (parameters and active ratios).
"""

from __future__ import annotations

from safetensors.torch import load_file

from llmcarve.eval.accounting import measured_active_ratio, parameter_report
from llmcarve.io import atomic_directory, ensure_free_space, write_json
from llmcarve.jobs.atp import atp_model, load_atp_run
from llmcarve.jobs.models import save_named_model
from llmcarve.jobs.tomoe import load_tomoe_run, tomoe_model
from llmcarve.methods.baselines.static import prune_static
from llmcarve.models.adapters import Geometry
from llmcarve.models.loading import load_model, saved_model_bytes
from llmcarve.names import NAME_TOLERANCE, ModelName
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "remove"


def convert_atp_run(directory, seed: int):
    """Load the dense model afresh (merging consumes it) and convert one atp-<domain>@p run."""
    dense, _ = load_model(ARTIFACTS / "model")
    return atp_model(dense, *load_atp_run(directory), seed)


def run(params: Params) -> None:
    with stage_run("remove", {"tomoe": params.tomoe.model_dump(), "static": params.static.model_dump(), "atp": params.atp.model_dump()}) as tracker:
        dense, tokenizer = load_model(ARTIFACTS / "model")
        geometry = Geometry.from_config(dense.config)
        stats = load_file(ARTIFACTS / "calibration" / "stats.safetensors")
        carved = {}
        for p in params.tomoe.budgets:
            name = ModelName("tomoe", budget=p)
            heads, training = load_tomoe_run(ARTIFACTS / "tomoe" / str(name), geometry, params.tomoe.num_experts)
            carved[name] = tomoe_model(dense, heads, params.tomoe.offset, training["v_topk"])
        for p in params.static.budgets:
            carved[ModelName("static", budget=p)] = prune_static(dense, stats, p)
        removal = {}
        for domain in params.atp.domains:
            for p in params.atp.budgets:
                name = ModelName("atp", domain=domain, budget=p)
                carved[name], removal[name] = convert_atp_run(ARTIFACTS / "atp" / str(name), params.seed)
        for name, model in carved.items():  # every name is checked before the first model is written
            name.check_measured(measured_active_ratio(model), params.tomoe.name_tolerance if name.method == "tomoe" else NAME_TOLERANCE)
        # all models at once, before the first is written: the old outputs stay until the rename
        ensure_free_space(OUT, sum(saved_model_bytes(m) for m in carved.values()), f"the carved models ({', '.join(map(str, carved))})")
        report = {}
        with atomic_directory(OUT) as staging:
            for name, model in carved.items():
                save_named_model(model, tokenizer, staging / str(name), name)
                report[str(name)] = parameter_report(model, context_len=512) | ({"removal": removal[name]} if name in removal else {})
        write_json(METRICS / "remove.json", report)
        tracker.log_metrics(report)


if __name__ == "__main__":
    main(run, __doc__)
