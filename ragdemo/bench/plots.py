"""Benchmark plots (matplotlib, Agg): quality vs TTFT with its Pareto front, storage per method, needle heatmaps."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # no display on servers and inside the Gradio worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ..units import fmt_bytes  # noqa: E402
from .defaults import pareto_front  # noqa: E402


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def quality_metric(run) -> tuple[str, str]:
    """Context value kept when it is defined for the run, else F1."""
    if any(_finite(r["value_kept"]) for r in run.summary):
        return "value_kept", "context value kept (%)"
    return "f1", "F1 (%)"


def plot_pareto(run, path: Path) -> Path | None:
    key, axis_label = quality_metric(run)
    rows = [r for r in run.summary if _finite(r["ttft_s"]) and _finite(r[key])]
    if not rows:
        return None
    scale = 100 if key == "value_kept" else 1
    points = [(r["ttft_s"], r[key] * scale) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, zorder=3)
    for r, p in zip(rows, points):
        ax.annotate(r["method"], p, textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red", lw=1,
            label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("mean time to first token (s, log)")
    ax.set_ylabel(axis_label)
    ax.set_title(f"{run.meta['dataset']}: quality vs TTFT (ref = {run.meta['reference']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def short_labels(labels: list[str]) -> list[str]:
    """Variant labels without the method name when they all share it ('btr@split=18@lora=0' -> 'split=18 lora=0')."""
    names = {label.split("@", 1)[0] for label in labels}
    if len(names) != 1:
        return labels
    return [label.split("@", 1)[1].replace("@", " ") if "@" in label else label for label in labels]


def plot_speedup(run, path: Path) -> Path | None:
    """Context value kept against 'x faster than the reference' (its TTFT / the method's, same run), one point
    per variant with its Pareto front: the frontier view of a knob sweep. Needs at least two non-reference rows."""
    ref = run.meta["reference"]
    rows = [r for r in run.summary if r["method"] != ref and _finite(r.get("ttft_vs_ref")) and r["ttft_vs_ref"]
            and _finite(r.get("value_kept"))]
    if len(rows) < 2:
        return None
    points = [(1 / r["ttft_vs_ref"], 100 * r["value_kept"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.4, 4.6), dpi=110)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=36, zorder=3)
    for label, p in zip(short_labels([r["method"] for r in rows]), points):
        ax.annotate(label, p, textcoords="offset points", xytext=(4, 3), fontsize=6.5)
    front = pareto_front([(-x, y) for x, y in points])  # faster and better is the corner to reach
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red", lw=1,
            label="Pareto front", zorder=2)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.axhline(100.0, color="grey", lw=0.8)
    ax.set_xlabel(f"x faster than {ref} (its TTFT / the method's, same run)")
    ax.set_ylabel(f"context value kept (% of {ref})")
    ax.set_title(f"{run.meta['dataset']}: value kept vs speed-up over {ref}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_runs_speedup(runs: list[dict], method: str, path: Path) -> Path | None:
    """One frontier over several bench runs (their results.json): every row of `method` and its variants, each
    speed-up taken against its own run's reference, so runs made at different times still compare."""
    rows = [r for run in runs for r in run["summary"] if r["method"].split("@", 1)[0] == method]
    meta = {key: "/".join(sorted({str(run["meta"][key]) for run in runs})) for key in ("reference", "dataset")}
    return plot_speedup(SimpleNamespace(meta=meta, summary=rows), path)


def plot_storage(run, path: Path) -> Path | None:
    rows = [r for r in run.summary if _finite(r["storage_bytes"])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    values = [r["storage_bytes"] / 1e6 for r in rows]
    ax.barh([r["method"] for r in rows], values, color="tab:blue")
    for i, (r, v) in enumerate(zip(rows, values)):
        bpt = r.get("bytes_per_token")
        text = fmt_bytes(r["storage_bytes"]) + (f" · {bpt:,.0f} B/tok" if _finite(bpt) and bpt else "")
        ax.text(v, i, " " + text, va="center", fontsize=8)
    ax.set_xlabel("cached artifacts per collection (MB)")
    ax.set_title(f"{run.meta['dataset']}: storage per method", fontsize=10)
    ax.margins(x=0.35)
    return _save(fig, path)


def plot_needle(run, path: Path) -> Path | None:
    cells = [r for r in run.records if "length" in r["meta"] and "depth" in r["meta"]]
    specs = [s for s in run.specs if s.answers]
    if not cells or not specs:
        return None
    lengths = sorted({r["meta"]["length"] for r in cells})
    depths = sorted({r["meta"]["depth"] for r in cells})
    fig, axes = plt.subplots(1, len(specs), figsize=(2.6 * len(specs) + 0.8, 2.9), dpi=110, squeeze=False)
    for ax, spec in zip(axes[0], specs):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in cells:
            res = r["results"].get(spec.label, {})
            if res.get("answered"):
                grid[lengths.index(r["meta"]["length"]), depths.index(r["meta"]["depth"])] = 100 * res.get("keywords", 0)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth (%)", fontsize=8)
        ax.set_title(spec.label, fontsize=9)
    axes[0][0].set_ylabel("context tokens", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="needle keywords found (%)", shrink=0.85)
    fig.suptitle("needle in a haystack: keywords 'sandwich', 'Dolores Park' in the answer", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(run, out: Path) -> list[Path]:
    made = [plot_pareto(run, out / "quality_vs_ttft.png"), plot_speedup(run, out / "value_vs_speedup.png"),
            plot_storage(run, out / "storage.png"),
            plot_needle(run, out / "needle_heatmap.png")]
    return [p for p in made if p]
