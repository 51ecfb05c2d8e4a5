"""A bench run written out and read back: the cells and headers every table shows (summary.md, the Benchmark tab,
cards, README), summary.md with its notes and needle grids, summary.csv, results.json and the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..units import fmt_bytes, fmt_s, fmt_speed
from .choices import MEASURES as CHOICE_MEASURES
from .metrics import BOOTSTRAP_SAMPLES, INDICATIVE_BELOW, MIN_MEAN_GAP, MIN_QUESTION_GAP
from .summary import SUMMARY_COLUMNS, interval_of

if TYPE_CHECKING:
    from .runner import BenchRun
    from .specs import MethodSpec


def reference_name(run_or_meta) -> str:
    ref = (run_or_meta.meta if hasattr(run_or_meta, "meta") else run_or_meta).get("reference", "rag")
    return "RAG" if ref == "rag" else ref


def fmt_cell(row: dict, key: str, reference: str = "RAG") -> str:
    """One summary cell as every table shows it (the bench's summary.md, the Benchmark tab, cards, README)."""
    value = row.get(key)
    if key in ("value_kept", "contains_vs_ref", "f1_vs_ref", "acc", "acc_norm"):
        return interval_of(row, key).text()
    if key == "speedup":
        return fmt_speed(value, reference)
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "value_kept_median":
        return f"{100 * value:.0f}%"
    if key in ("em", "contains", "keywords"):
        return f"{value:.0f}%"
    if key == "bytes_per_token":
        return f"{value:,.1f} B"
    if key in ("ttft_s", "total_s"):
        return fmt_s(value)
    if key == "nll":
        return f"{value:.3f}"
    if key == "storage_bytes":
        return fmt_bytes(value)
    if key in ("prompt_tokens", "n", "errors", "value_kept_n"):
        return f"{value:,.0f}"
    if key == "prepare_s":
        return f"{value:.1f}"
    return f"{value:.1f}"


MD_HEADERS = {"method": "method", "n": "n", "errors": "errors", "em": "EM", "f1": "F1", "contains": "contains",
              "keywords": "keywords", "acc": "MC acc [95% CI]", "acc_norm": "MC acc_norm [95% CI]",
              "nll": "gold NLL", "value_kept": "value kept [95% CI]",
              "contains_vs_ref": "contains vs ref [95% CI]", "f1_vs_ref": "F1 vs ref [95% CI]",
              "value_kept_median": "value kept (median)", "value_kept_n": "median over n", "ttft_s": "TTFT",
              "speedup": "TTFT vs ref", "total_s": "total", "prompt_tokens": "prompt tok",
              "processed_tokens": "processed tok", "cached_tokens": "cached tok", "bytes_per_token": "bytes/tok",
              "storage_bytes": "stored", "prepare_s": "prepare s"}


def column_header(key: str, reference: str = "RAG") -> str:
    return MD_HEADERS[key].replace("vs ref", f"vs {reference}")


def summary_columns(run: BenchRun) -> list[str]:
    """Every summary column, without those the run has nothing for (keyword recall, multiple choice)."""
    absent = set() if any(r.get("keywords") for r in run.records) else {"keywords"}
    absent |= set() if has_choices(run) else set(CHOICE_MEASURES)
    return [c for c in SUMMARY_COLUMNS if c not in absent]


def has_choices(run: BenchRun) -> bool:
    return any(r.get("options") for r in run.records)


def row_label(run: BenchRun, row: dict) -> str:
    label = row["method"] + ("" if _spec(run, row["method"]).answers else " (NLL only)")
    return label + (" (indicative: < %d questions)" % INDICATIVE_BELOW if row.get("indicative") else "")


def summary_markdown_table(run: BenchRun) -> str:
    cols, reference = summary_columns(run), reference_name(run)
    lines = ["| " + " | ".join(column_header(c, reference) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in run.summary:
        lines.append("| " + " | ".join(row_label(run, row) if c == "method" else fmt_cell(row, c, reference)
                                       for c in cols) + " |")
    return "\n".join(lines)


def _spec(run: BenchRun, label: str) -> MethodSpec:
    return next(s for s in run.specs if s.label == label)


def disagreements(run: BenchRun) -> list[str]:
    return [f"{row['method']}: {row['disagreement']}" for row in run.summary if row.get("disagreement")]


def summary_markdown(run: BenchRun) -> str:
    m = run.meta
    machine = m["machine"]
    reference = reference_name(run)
    lines = [f"# Benchmark: {m['dataset']}", "",
             f"- data: {m['description']}",
             f"- model: {m['model']} ({m['dtype']}, {m['device']}), max new tokens {m['max_new_tokens']}",
             f"- machine: {machine['cores']} cores, {machine['memory']}, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), {machine['platform']}",
             f"- date: {m['date']}, wall time {m['seconds']:.0f} s"]
    if m.get("attention"):
        lines.insert(4, f"- attention: {m['attention']}")
    if m.get("command"):
        lines.append(f"- command: `{m['command']}`")
    lines += [f"- reference for context value kept and TTFT ratio: **{m['reference']}**",
              "- method order: rotated from question to question"]
    if m.get("partial"):
        lines.append(f"- **{m['partial']}**")
    lines.append("")
    lines += [summary_markdown_table(run), ""]
    found = disagreements(run)
    if found:
        lines += ["**Where the two quality signals disagree:**", ""] + [f"- {line}" for line in found] + [""]
    lines += ["EM / F1 / contains are percentages over answered questions (SQuAD normalisation, best over the gold "
              "answers; contains = a normalised gold answer appears as whole words in the normalised answer). "
              "Gold NLL is the mean teacher-forced NLL per token of the first gold answer.",
              f"**Value kept** = Σ(NLL_closed_book − NLL_method) / Σ(NLL_closed_book − NLL_{m['reference']}) over "
              "the same questions: a ratio of summed gaps, stable where per-question ratios explode; \"–\" (n/a) when "
              f"the reference beats closed book by less than {MIN_MEAN_GAP} nats per token on average. "
              f"**Contains / F1 vs {reference}** = the method's mean over the reference's on the questions both "
              "answered. [low, high] = 95% paired bootstrap interval (questions resampled, method and reference "
              f"together, {BOOTSTRAP_SAMPLES:,} times). The median of "
              f"per-question ratios is taken over the questions where the reference beats closed book by at least "
              f"{MIN_QUESTION_GAP} nats (their count is shown). Rows on fewer than {INDICATIVE_BELOW} questions are "
              f"indicative only. TTFT vs {reference} = the reference's mean TTFT over this method's, on the questions "
              "both answered.",
              "Stored = each method's artifacts for the collection, everything counted (mean per collection); "
              "bytes/tok = that over the collection's tokens. \"NLL only\" rows were added to score context value kept."]
    if has_choices(run):
        lines.append(f"**MC acc** = the share of multiple-choice questions where the option with the highest "
                     "log-likelihood as the answer (summed over its tokens, given the question and the context the "
                     "method reads, through its own NLL path) is the gold one; **MC acc_norm** divides each option's "
                     "log-likelihood by its length in characters first (lm-evaluation-harness's acc and acc_norm). "
                     f"[low, high] = 95% bootstrap interval over questions ({BOOTSTRAP_SAMPLES:,} resamples, the same "
                     "draws for every method). EM / F1 / contains score the generated answer against the gold option.")
    limited = [s for s in run.specs if s.limit]
    if limited:
        lines.append("Methods limited to the first questions (too slow for all): " +
                     ", ".join(f"{s.label} ({s.limit})" for s in limited) + "; their value kept uses the same questions.")
    errors = [(r["id"], label, res["error"]) for r in run.records for label, res in r["results"].items() if res.get("error")]
    if errors:
        lines += ["", f"{len(errors)} answers failed; first: {errors[0][1]} on {errors[0][0]}: {errors[0][2][:200]}"]
    grid = needle_grids(run)
    if grid:
        lines += ["", "## Needle grid (contains / keyword recall %, rows = context tokens, columns = depth %)", "", grid]
    return "\n".join(lines) + "\n"


def needle_grids(run: BenchRun) -> str:
    cells = [r for r in run.records if "length" in r["meta"] and "depth" in r["meta"]]
    if not cells:
        return ""
    lengths = sorted({r["meta"]["length"] for r in cells})
    depths = sorted({r["meta"]["depth"] for r in cells})
    out = []
    for spec in run.specs:
        if not spec.answers:
            continue
        out += [f"**{spec.label}**", "", "| tokens | " + " | ".join(f"{d:g}%" for d in depths) + " |",
                "|---|" + "---|" * len(depths)]
        for length in lengths:
            row = []
            for depth in depths:
                res = [r["results"].get(spec.label, {}) for r in cells
                       if r["meta"]["length"] == length and r["meta"]["depth"] == depth]
                row.append(" ".join(_cell(x) for x in res) or "–")
            out.append(f"| {length} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _cell(res: dict) -> str:
    if not res.get("answered"):
        return "err" if res.get("error") else "–"
    return f"{100 * res.get('contains', 0):.0f} / {100 * res.get('keywords', 0):.0f}"


def write_outputs(run: BenchRun, out: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    results = out / "results.json"
    results.write_text(json.dumps({"meta": run.meta, "summary": run.summary, "storage": run.storage,
                                   "questions": run.records}, indent=1, default=_json_default, allow_nan=True))
    cols = summary_columns(run)
    csv = out / "summary.csv"
    csv.write_text(",".join(cols) + "\n" + "\n".join(
        ",".join(_csv(row[c]) for c in cols) for row in run.summary) + "\n")
    md = out / "summary.md"
    md.write_text(summary_markdown(run))
    written += [results, csv, md]
    if plots:
        from .plots import make_plots

        written += make_plots(run, out)
    return written


def _csv(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '""') + '"' if ("," in value or '"' in value) else value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}"


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


def load_run(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def load_run_or_summary(path: str | Path) -> dict:
    """A bench run from its output folder or its results.json."""
    path = Path(path)
    return load_run(path / "results.json" if path.is_dir() else path)
