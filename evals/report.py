"""Output of an evaluation: ``metrics.json``, the summary table (percentages) and the sweep plot."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from vlmkit.evals.files import write_atomic

TABLE_KEYS = {
    "chair": ("chair_s", "chair_i", "recall", "precision", "f1", "len"),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"),
    "mmhal": ("score", "hallucination_rate"),
}
#: keys printed as they are (not x100)
RAW_KEYS = ("score",)
#: the metric a sweep plot shows per task
HEADLINE = {"chair": "chair_i", "pope": "f1", "mmhal": "score"}


def write_metrics(out_dir: str | Path, metrics: dict) -> Path:
    return write_atomic(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def _cell(key: str, value: float) -> str:
    return f"{value:.2f}" if key in RAW_KEYS else f"{100 * value:.1f}"


def table(rows: Sequence[tuple[str, dict]], keys: Sequence[str]) -> str:
    """A plain-text table, one row per ``(name, metrics)``; fractions printed as percentages."""
    header = [""] + [k if k in RAW_KEYS else f"{k} %" for k in keys]
    body = [[name] + [_cell(k, m[k]) if k in m else "-" for k in keys] for name, m in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def summary(task: str, metrics: dict) -> str:
    """The table a finished evaluation prints."""
    keys = TABLE_KEYS[task]
    if task == "pope":
        rows = [(split, m) for split, m in metrics["splits"].items()]
        rows += [("mean", metrics)] if len(rows) > 1 else []
        note = f"parser: {metrics['parser']}"
    elif task == "mmhal":
        rows = [("all", metrics)] + [(f"  {t}", {"score": s}) for t, s in metrics["per_type"].items()]
        note = f"judge: {metrics['judge']}; replies without a rating: {metrics['parse_failures']}"
    else:
        rows = [(f"{metrics['n']} captions", metrics)]
        note = f"pipeline: {metrics['pipeline']}; ground truth: {metrics['ground_truth']}; len = mean tokens"
    return table(rows, keys) + "\n" + note


def sweep_plot(points: Sequence[tuple[str, float, float]], task: str, path: str | Path) -> Path:
    """``(label, mean visual tokens kept, headline metric)`` per run -> a PNG line plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = HEADLINE[task]
    scale = 1 if metric in RAW_KEYS else 100
    by_method: dict[str, list[tuple[float, float]]] = {}
    for label, kept, value in points:
        method = re.sub(r"keep=[^,]*,?", "", label).rstrip(":,")  # the spec without its budget
        by_method.setdefault(method, []).append((kept, scale * value))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for method, runs in by_method.items():  # one line per method, over its budgets
        runs.sort()
        ax.plot([x for x, _ in runs], [y for _, y in runs], marker="o", label=method)
    ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("visual tokens kept (mean over samples and LLM layers)")
    ax.set_ylabel(metric if scale == 1 else f"{metric} (%)")
    ax.set_title(f"{task}: {metric} against kept visual tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
