"""Measured figures as screens show them, every one read from the results suite (`cards/suite.py`): each method's
"Measured" section, the Methods tab's one-line headline, and the README's headline table."""
from __future__ import annotations

from typing import Callable

from ..bench.defaults import check_default
from ..bench.report import column_header, fmt_cell
from ..bench.suite import BTR_BAR, BTR_CANDIDATES, BTR_DEFAULT, BTR_UNTRAINED, default_row
from ..bench.summary import interval_of
from ..units import fmt_bytes, fmt_speed
from .suite import Suite, load_suite

CARD_COLUMNS = ["n", "contains", "f1", "value_kept", "contains_vs_ref", "ttft_s", "speedup", "prompt_tokens",
                "processed_tokens", "bytes_per_token"]
NOT_RUN = ("not measured in this checkout: `python -m ragdemo results` runs the suite (see docs/RESULTS.md) and "
           "this section then shows its figures")


def base_name(label: str) -> str:
    return label.split("@")[0]


def variants(suite: Suite, section: str, method: str) -> list[str]:
    """The labels of `method`'s rows in a bench section, in the run's order."""
    return [label for label in suite.rows(section) if base_name(label) == method]


def rows_table(suite: Suite, section: str, labels: list[str], columns: list[str] = CARD_COLUMNS) -> str:
    """A markdown table of these rows of a bench section, RAG's first, formatted as the bench formats them."""
    rows = suite.rows(section)
    labels = (["rag"] if "rag" in rows and "rag" not in labels else []) + [l for l in labels if l in rows]
    lines = ["| method | " + " | ".join(column_header(c) for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([f"`{label}`"] + [fmt_cell(rows[label], c) for c in columns]) + " |" for label in labels]
    return "\n".join(lines)


def disagreement_lines(suite: Suite, section: str, labels: list[str]) -> list[str]:
    rows = suite.rows(section)
    return [f"- `{label}`: {rows[label]['disagreement']}" for label in labels
            if label in rows and rows[label].get("disagreement")]


def measured_section(method: str, suite: Suite | None = None) -> str:
    """The card's "Measured" part for `method`: its rows of the suite's SQuAD run (with RAG's), where the two
    quality signals disagree, and the figures only this method has (storage, ceilings, held-out checks)."""
    suite = suite or load_suite()
    if suite is None:
        return f"**Measured:** {NOT_RUN}."
    labels = variants(suite, "squad", method)
    if not labels:
        return f"**Measured:** `{method}` is not in this suite's SQuAD run ({suite.where()})."
    meta = (suite.data("squad") or {}).get("meta", {})
    parts = [f"**Measured** on {meta.get('description', 'SQuAD')}, reference RAG, max {meta.get('max_new_tokens', '?')} "
             f"new tokens; one run of the results suite: {suite.where()}.", "", rows_table(suite, "squad", labels)]
    parts += [""] + disagreement_lines(suite, "squad", labels)
    extra = EXTRAS.get(method)
    if extra:
        parts += ["", extra(suite)]
    return "\n".join(p for p in parts if p is not None).strip()


# ------------------------------------------------------------------ what only some methods have
def _row(suite: Suite, section: str, label: str) -> dict | None:
    return suite.rows(section).get(label)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def _target(suite: Suite, method: str, min_value: float, min_speedup: float | None = None) -> str:
    label = default_row(method)
    row = _row(suite, "squad", label)
    if row is None:
        return f"`{label}` is not in this suite"
    value, speed = interval_of(row, "value_kept"), row.get("speedup")
    ok = value.value >= min_value and (min_speedup is None or (speed or 0) >= min_speedup)
    want = f"≥{min_value:.0%} of RAG's value kept" + (f" at ≥{min_speedup:g}x faster TTFT" if min_speedup else "")
    return (f"target for `{label}` ({want}): {_verdict(ok)}, {value.text()} at {fmt_speed(speed)}; answers "
            f"{interval_of(row, 'contains_vs_ref').text()} of RAG's contains")


def _speed_rows(suite: Suite, method: str) -> str:
    speed = suite.data("speed") or {}
    rows = [r for r in speed.get("methods", []) if r["method"] == method]
    if not rows:
        return ""
    lines = [f"- `{r['label']}`: TTFT {r['ms']['ttft']:.0f} ms, {fmt_speed(r['speedup'])} in that run; "
             f"ceiling {r['ceiling']:.2f}x (what TTFT could reach if only the model counted), so "
             f"{r['speedup'] / r['ceiling']:.0%} of it" for r in rows]
    return f"Where the time goes (`{suite.relative('speed')}/speed.txt`, medians over its questions):\n" + "\n".join(lines)


def _storage_rows(suite: Suite, method: str) -> str:
    storage = suite.data("storage") or {}
    rows = [r for r in storage.get("rows", []) if base_name(r["method"]) == method]
    if not rows:
        return ""
    lines = [f"- {r['collection']} ({r['tokens']:,} tokens), `{r['method']}`: {r['bytes_per_token']:,.1f} B per token "
             f"everything counted ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in r['shared'].items()) or 'no shared parts'}"
             f"), {r['fp16_kv_bytes_per_token'] / max(r['bytes_per_token'], 1e-9):,.0f}x smaller than an fp16 KV cache"
             for r in rows]
    return f"Storage, every byte counted (`{suite.relative('storage')}`):\n" + "\n".join(lines)


def _heldout(suite: Suite, method: str, why: str) -> str:
    labels = variants(suite, "heldout", method)
    if not labels:
        return ""
    meta = (suite.data("heldout") or {}).get("meta", {})
    return (f"{why} The same rows on other questions ({meta.get('description', 'held-out SQuAD questions')}), "
            f"same run:\n\n{rows_table(suite, 'heldout', labels)}")


def _btr(suite: Suite) -> str:
    storage = suite.data("storage") or {}
    ratios = [r["fp16_kv_bytes_per_token"] / r["bytes_per_token"] for r in storage.get("rows", [])
              if base_name(r["method"]) == "btr" and r["bytes_per_token"]]
    storage_target = (f"storage ≥100x smaller than an fp16 KV cache, everything counted: "
                      f"{_verdict(min(ratios) >= 100) if ratios else 'not measured'}"
                      + (f" ({min(ratios):,.0f}x on the smallest collection)" if ratios else ""))
    return "\n\n".join(p for p in (
        _storage_rows(suite, "btr"), _speed_rows(suite, "btr"),
        f"Targets: {_target(suite, 'btr', 0.95, 2.0)}; {storage_target}.",
        _heldout(suite, "btr", _btr_default(suite))) if p)


def _btr_default(suite: Suite) -> str:
    """How the default was chosen, from this run's rows: the rule, both attempts' picks, the checks on seed 1."""
    squad, heldout = suite.rows("squad"), suite.rows("heldout")
    first = check_default(squad, heldout, BTR_UNTRAINED, default_row("btr"), BTR_BAR)
    second = check_default(squad, heldout, BTR_CANDIDATES, BTR_DEFAULT, BTR_BAR, rivals=BTR_UNTRAINED)
    rule = ("How the default was chosen (a rule fixed before the runs, `bench/defaults.py`): on the main run's "
            f"questions, the fastest candidate keeping ≥{BTR_BAR:.0%} of RAG's value (if none does, the one keeping "
            "most); confirmed on the other articles and questions when no candidate there is both faster and keeps "
            f"more, and its value-kept interval reaches {BTR_BAR:.0%}.")
    candidates = ", ".join(f"`{label}`" for label in BTR_CANDIDATES)
    attempts = [f"First attempt, among the 1-bit variants without training (a 2-bit one, which the rule as first "
                f"written picked, was taken out after a first run: BTR's states are 1-bit): {_attempt(first)}",
                "Second attempt, written after the first failed and before any run of a trained variant: the "
                "candidates are the trained reader (`train=1`: a LoRA on the upper layers distilled from RAG's "
                "reading on cloze questions about the collection's own chunks, as the paper trains its reader), "
                f"{candidates}; the untrained rows (`lora=0`) may still beat the pick: {_attempt(second)}"]
    trained, untrained = heldout.get(BTR_DEFAULT), heldout.get(default_row("btr"))
    prepared = f" ({trained['prepare_s']:.0f} s of preparation here)" if trained and trained.get("prepare_s") else ""
    shipped = (f"The shipped knobs are those of `{BTR_DEFAULT}` without `train`: Fine-tune (Library tab) trains the "
               f"adapter, and the defaults read it from then on (`lora` is on){prepared}; training is not a default "
               "because a shared app refuses it and uploads stay fast. Until then the defaults read no adapter "
               f"(`{default_row('btr')}`)"
               + (f": {fmt_cell(untrained, 'value_kept')} of RAG's value on the other questions." if untrained else "."))
    return " ".join([rule, *attempts, shipped])


def _attempt(check) -> str:
    """One attempt of the rule as the card says it: its pick, the check on the other questions, the verdict."""
    if check.picked is None:
        return "no candidate has a value kept in this run."
    pick = f"the rule picks `{check.picked}`" + ("" if check.matches else f" (the default is `{check.default}`)")
    if check.on_front is None:
        return f"{pick}; not run on the other questions."
    front = ("on the Pareto front (none both faster and keeping more value)" if check.on_front
             else "beaten on both axes by " + ", ".join(f"`{label}`" for label in check.dominated_by))
    bar = (f"its value-kept interval reaches {check.value_high:.0%}, "
           + ("so the bar is within reach" if check.reaches_bar else f"below the {check.bar:.0%} bar"))
    verdict = "**confirmed**" if check.confirmed else "**not confirmed**"
    there = ("" if check.picked_there in (None, check.picked)
             else f" On those questions alone the rule would pick `{check.picked_there}`.")
    return f"{pick}; on the other questions the default is {front}; {bar}: {verdict}.{there}"


def _lloco(suite: Suite) -> str:
    return "\n\n".join(p for p in (_storage_rows(suite, "lloco"), _speed_rows(suite, "lloco"),
                                   f"Targets: {_target(suite, 'lloco', 0.85, 5.0)}.") if p)


def _cacheblend(suite: Suite) -> str:
    return f"Target: {_target(suite, 'cacheblend', 0.98, 2.0)}."


def _lingua(suite: Suite) -> str:
    return "\n\n".join(p for p in (
        f"Target: {_target(suite, 'lingua', 0.85)}.",
        _heldout(suite, "lingua", "Why the defaults are `unit=word`, `spread=0.5`: chosen on earlier questions "
                                  "against LLMLingua's plain selection (`spread=0@unit=token`).")) if p)


def _retro(suite: Suite) -> str:
    data = suite.data("squad") or {}
    answered = [q["results"]["retro"] for q in data.get("questions", [])
                if q["results"].get("retro", {}).get("answered")]
    if not answered:
        return ""
    again = sum(1 for r in answered if r.get("events", 0) > 1)  # the first event is the question's retrieval
    return (f"{again} of {len(answered)} answers re-retrieved at least once during generation (the others ended "
            "before the first stride); re-retrievals are after the first token, so the row's TTFT and token counts "
            "are those of the question's retrieval.")


def _jrt(suite: Suite) -> str:
    jrt, rag = _row(suite, "squad", "jrt"), _row(suite, "squad", "rag")
    if not (jrt and rag and rag.get("prompt_tokens")):
        return ""
    return (f"JRT reads {jrt['prompt_tokens'] / rag['prompt_tokens']:.2f}x RAG's prompt tokens "
            f"({fmt_cell(jrt, 'prompt_tokens')} against {fmt_cell(rag, 'prompt_tokens')}) on a Transformer, where the "
            "paper expects no gain: the context is already visible to every later token.")


def _rag(suite: Suite) -> str:
    joined = _row(suite, "squad", "rag@join=1")
    if joined is None:
        return ""
    return (f"Why one passage per chunk: RAG reading the same chunks with touching ones joined (`rag@join=1`) keeps "
            f"{fmt_cell(joined, 'value_kept')} of this layout's value and its answers contain the gold answer "
            f"{fmt_cell(joined, 'contains_vs_ref')} as often; the layout every reuse method can store is the "
            "reference, so value kept measures their approximation and nothing else.")


EXTRAS: dict[str, Callable[[Suite], str]] = {"rag": _rag, "btr": _btr, "lloco": _lloco, "cacheblend": _cacheblend,
                                             "lingua": _lingua, "retro": _retro, "jrt": _jrt}


# ------------------------------------------------------------------ one line per method, one table for the README
def headline(method: str, suite: Suite | None = None) -> str:
    """The Methods tab's measured line for `method` at its defaults, from the suite's SQuAD run."""
    suite = suite or load_suite()
    row = suite.rows("squad").get(default_row(method)) if suite else None
    if row is None:
        return NOT_RUN if suite is None else f"not in this suite's SQuAD run ({suite.relative()})"
    rag = suite.rows("squad").get("rag", {})
    where = f"SQuAD, {row['n']} questions"
    if method == "rag":
        return f"{where}: contains {fmt_cell(row, 'contains')}, TTFT {fmt_cell(row, 'ttft_s')} (the reference)"
    if method == "closed_book":
        return (f"{where}: contains {fmt_cell(row, 'contains')} (RAG {fmt_cell(rag, 'contains')}), the 0% point of "
                f"value kept, TTFT {fmt_cell(row, 'ttft_s')}, {fmt_cell(row, 'speedup')}")
    return (f"{where}: value kept {fmt_cell(row, 'value_kept')}, contains {fmt_cell(row, 'contains_vs_ref')} of "
            f"RAG's, TTFT {fmt_cell(row, 'ttft_s')}, {fmt_cell(row, 'speedup')}; stores "
            f"{_per_token(row)}")


def _per_token(row: dict) -> str:
    value = row.get("bytes_per_token")
    return "nothing" if not value or value != value else f"{fmt_bytes(value)} per collection token"


def headline_table(methods: list[str], labels: dict[str, str], suite: Suite | None = None) -> str:
    """The README's table: each method at its defaults, from the suite's SQuAD run."""
    suite = suite or load_suite()
    if suite is None:
        return NOT_RUN
    rows = suite.rows("squad")
    lines = ["| method | value kept [95% CI] | contains vs RAG [95% CI] | TTFT vs RAG | stored per token |",
             "|---|---|---|---|---|"]
    for name in methods:
        row = rows.get(default_row(name))
        if row is None:
            continue
        stored = row.get("bytes_per_token")
        lines.append(f"| {labels.get(name, name)} | {fmt_cell(row, 'value_kept')} | {fmt_cell(row, 'contains_vs_ref')} | "
                     f"{fmt_cell(row, 'speedup')} | {fmt_bytes(stored) if stored and stored == stored else '0 B'} |")
    return "\n".join(lines) + f"\n\nFrom {suite.where()}."
