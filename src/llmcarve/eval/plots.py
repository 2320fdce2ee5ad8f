"""PNG plots of evaluation results (look at them: they are what a reader sees first)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on pipeline workers
import matplotlib.pyplot as plt  # noqa: E402

from llmcarve.names import ModelName  # noqa: E402


def plot_evaluation(models: dict, path: Path) -> None:
    """Left: accuracy per task and model; right: perplexity per corpus and model."""
    names = list(models)
    tasks = sorted({t for r in models.values() for t in [*r["zero_shot"], *r["domain"]]})
    corpora = sorted({c for r in models.values() for c in r["ppl"]})
    fig, (acc_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(names), 1)
    for offset, name in enumerate(names):
        scores = {**models[name]["zero_shot"], **models[name]["domain"]}
        xs = [i + offset * width for i in range(len(tasks))]
        acc_ax.bar(xs, [scores[t]["acc"] if t in scores else 0 for t in tasks], width, label=name)
        ppl_ax.bar([i + offset * width for i in range(len(corpora))], [models[name]["ppl"][c]["ppl"] for c in corpora], width, label=name)
    acc_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    acc_ax.set_ylabel("accuracy (acc)")
    acc_ax.set_title("multiple choice")
    ppl_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(corpora))], corpora, rotation=30, ha="right")
    ppl_ax.set_ylabel("perplexity")
    ppl_ax.set_title("held-out perplexity")
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def method_of(name: str) -> str:
    """'tomoe@0.5' -> 'tomoe', 'atp-medical@0.6' -> 'atp-medical', 'dense' -> 'dense'."""
    return ModelName.parse(name).series


def plot_perplexity_vs_active(models: dict, corpus: str, path: Path) -> None:
    """Held-out perplexity against the kept fraction of attention+MLP weights, one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    methods: dict[str, list[tuple[float, float]]] = {}
    for name, report in models.items():
        if corpus in report["ppl"]:
            methods.setdefault(method_of(name), []).append((report["active_ratio"], report["ppl"][corpus]["ppl"]))
    for method, points in sorted(methods.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("active attention+MLP weights per token (fraction of dense)")
    ax.set_ylabel(f"perplexity ({corpus})")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
