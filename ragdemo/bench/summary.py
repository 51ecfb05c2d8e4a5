"""A bench run's summary: one row per method (scores, value kept and answer quality against the reference with
their intervals, times, tokens, storage), computed from the run's per-question records."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .choices import MEASURES as CHOICE_MEASURES, accuracy_interval
from .metrics import (INDICATIVE_BELOW, Interval, disagreement, median_value_kept, relative_interval,
                      value_kept_interval)

if TYPE_CHECKING:
    from .runner import BenchRun
    from .specs import MethodSpec

SUMMARY_COLUMNS = ["method", "n", "errors", "em", "f1", "contains", "keywords", "acc", "acc_norm", "nll", "value_kept",
                   "contains_vs_ref", "f1_vs_ref", "value_kept_median", "value_kept_n", "ttft_s", "speedup", "total_s",
                   "prompt_tokens", "processed_tokens", "cached_tokens", "bytes_per_token", "storage_bytes", "prepare_s"]


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(values)) if values else float("nan")


def summarize(run: BenchRun) -> list[dict]:
    ref = run.meta["reference"]
    return [_summary_row(run, spec, ref) for spec in run.specs]


def _summary_row(run: BenchRun, spec: MethodSpec, ref: str) -> dict:
    mine = [r for r in run.records if spec.label in r["results"]]
    answered = [r["results"][spec.label] for r in mine if r["results"][spec.label].get("answered")]
    triples = [(r["results"]["closed_book"]["nll"], r["results"][spec.label]["nll"], r["results"][ref]["nll"])
               for r in mine if "closed_book" in r["results"] and ref in r["results"]]
    median, median_n = median_value_kept(triples)
    value = value_kept_interval(*(list(x) for x in zip(*triples))) if triples else Interval(*[float("nan")] * 3)
    row = {"method": spec.label, "n": len(mine),
           "errors": sum(1 for r in mine if r["results"][spec.label].get("error")) if spec.answers else 0,
           "nll": _mean(r["results"][spec.label]["nll"] for r in mine),
           "value_kept": value.value, "value_kept_interval": value.to_dict(),
           "value_kept_median": median, "value_kept_n": median_n,
           "indicative": len(triples) < INDICATIVE_BELOW,
           "storage_bytes": _mean(run.storage.get(spec.label, [])),
           "prepare_s": run.prepare_s.get(spec.label, 0.0)}
    for key in ("em", "f1", "contains", "keywords"):
        row[key] = 100 * _mean(a.get(key) for a in answered) if spec.answers else float("nan")
    for key in ("ttft_s", "total_s", "prompt_tokens", "processed_tokens", "cached_tokens", "overhead_tokens",
                "bytes_per_token"):
        row[key] = _mean(a.get(key) for a in answered) if spec.answers else float("nan")
    ratio = _ttft_ratio(run.records, spec.label, ref) if spec.answers else float("nan")
    row["ttft_vs_ref"] = ratio  # this TTFT / the reference's (JSON); screens say it as `speedup` in words
    row["speedup"] = 1 / ratio if ratio and np.isfinite(ratio) else float("nan")
    answers = _relative(run.records, spec, ref, "contains") if spec.answers else Interval(*[float("nan")] * 3)
    row["contains_vs_ref"], row["contains_vs_ref_interval"] = answers.value, answers.to_dict()
    f1 = _relative(run.records, spec, ref, "f1") if spec.answers else Interval(*[float("nan")] * 3)
    row["f1_vs_ref"], row["f1_vs_ref_interval"] = f1.value, f1.to_dict()
    row["disagreement"] = disagreement(value, answers, ref.upper() if ref == "rag" else ref) if spec.label != ref else ""
    row.update(_choice_scores(mine, spec.label))
    return row


def _choice_scores(records: list[dict], label: str) -> dict:
    """Multiple-choice accuracy and acc_norm with their intervals, over the questions whose options were scored."""
    scored = [r["results"][label]["choices"] for r in records if "choices" in r["results"][label]]
    out = {}
    for measure in CHOICE_MEASURES:
        interval = accuracy_interval([c[measure] for c in scored])
        out[measure], out[f"{measure}_interval"] = interval.value, interval.to_dict()
    out["choices_n"] = len(scored)
    return out


def _relative(records: list[dict], spec: MethodSpec, ref: str, score: str) -> Interval:
    """A score of this method's answers over the reference's, on the questions both answered, with its interval."""
    pairs = [(r["results"][spec.label].get(score), r["results"][ref].get(score)) for r in records
             if r["results"].get(spec.label, {}).get("answered") and r["results"].get(ref, {}).get("answered")]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return Interval(*[float("nan")] * 3)
    mine, theirs = zip(*pairs)
    return relative_interval(mine, theirs)


def interval_of(row: dict, key: str) -> Interval:
    """A summary row's interval (`value_kept`, `contains_vs_ref`, `f1_vs_ref`) as an Interval."""
    found = row.get(f"{key}_interval") or {}
    nan = float("nan")
    return Interval(float(found.get("value", row.get(key, nan))), float(found.get("low", nan)),
                    float(found.get("high", nan)))


def _ttft_ratio(records: list[dict], label: str, ref: str) -> float:
    """Mean TTFT over mean reference TTFT, over only the questions both answered (with --limit, a method asked
    the first 20 questions is compared with the reference on those 20, not on all)."""
    pairs = [(r["results"][label]["ttft_s"], r["results"][ref]["ttft_s"]) for r in records
             if r["results"].get(label, {}).get("answered") and r["results"].get(ref, {}).get("answered")]
    if not pairs:
        return float("nan")
    mine, theirs = _mean(p[0] for p in pairs), _mean(p[1] for p in pairs)
    return mine / theirs if theirs > 0 else float("nan")
