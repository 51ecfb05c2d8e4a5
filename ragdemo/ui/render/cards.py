"""Each method's card while a Compare runs: its answer (streaming, then done), badges, and the figures of its
`Result` in a grid."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from ...bench.metrics import best_over_golds, contains
from ...machine import CpuShare
from ...methods import registry
from ...methods.base import GLOSSARY, Result
from ...units import fmt_bytes, fmt_s
from ...cards import one_liner
from .shared import MUTED, esc, fmt_num, method_colour


# A grid, not a flex row: every card has the same width whatever the row (flex stretches the last row's cards).
CARDS_STYLE = "display:grid;grid-template-columns:repeat(auto-fit,minmax(290px,1fr));gap:12px;align-items:stretch"
CARD_STYLE = ("border:1px solid #d1d5db;border-left-width:6px;border-radius:10px;padding:12px;background:#ffffff;"
              "color:#111827;font-size:14px;line-height:1.4;min-width:0")


@dataclass
class Card:
    """One method's card while a comparison runs: waiting, running (streaming text), then done."""

    method: str
    label: str
    status: str = "waiting"  # waiting | running | done
    text: str = ""
    result: Result | None = None
    started: float = field(default_factory=time.perf_counter)
    limit: int = 0  # max new tokens for this method: an answer that reaches it was cut
    golds: list[str] = field(default_factory=list)  # gold answers when the question is an example
    estimate: str = ""  # shown while waiting, e.g. full context's expected time

    def push(self, delta: str) -> None:
        self.text += delta


METRICS = [  # (field, label, formatter)
    ("prompt_tokens", "prompt tokens", fmt_num),
    ("processed_tokens", "processed", fmt_num),
    ("cached_tokens", "cached", fmt_num),
    ("new_tokens", "answer tokens", fmt_num),
    ("retrieve_s", "retrieve", fmt_s),
    ("load_s", "load", fmt_s),
    ("ttft_s", "TTFT", fmt_s),
    ("decode_s", "decode", fmt_s),
    ("total_s", "total", fmt_s),
    ("decode_tok_s", "decode tok/s", lambda v: f"{float(v or 0):.1f}"),
    ("storage_bytes", "storage read", fmt_bytes),
    ("bytes_per_token", "stored B/token", lambda v: f"{float(v or 0):.1f}"),
    ("chunk_bytes_per_token", "chunk B/token", lambda v: f"{float(v or 0):.1f}"),
]


def render_cards(cards: list[Card]) -> str:
    if not cards:
        return f"<div style='{MUTED}'>Pick methods and press Compare: each method's answer and costs appear here.</div>"
    body = "".join(render_card(c) for c in cards)
    return f"{busy_warning([c.result for c in cards if c.result])}<div class='rd-cards' style='{CARDS_STYLE}'>{body}</div>"


def busy_warning(results: list[Result]) -> str:
    """A banner when other programs used the CPU while these answers ran: their times say little then."""
    shares = [r.timings.get("others_cpu") for r in results if r.timings.get("others_cpu") is not None]
    busiest = max(shares, default=None)
    if busiest is None or not CpuShare(0.0, busiest).unreliable:
        return ""
    return (f"<div class='rd-busy' style='background:#fef3c7;color:#92400e;padding:8px;border-radius:6px;"
            f"margin-bottom:8px'>{esc(CpuShare(0.0, busiest).warning())}</div>")


def render_card(card: Card) -> str:
    result = card.result
    answer = result.answer if result else card.text
    head = (f"<div style='display:flex;justify-content:space-between;gap:8px'><b>{esc(card.label)}</b>"
            f"<span style='{MUTED};font-size:12px;white-space:nowrap'>{esc(_status_text(card))}</span></div>"
            f"<div class='rd-oneliner' style='{MUTED};font-size:12px;margin:2px 0 4px'>{esc(one_liner(card.method))}</div>")
    if card.status == "waiting" and card.estimate:
        head += f"<div class='rd-estimate' style='font-size:12px;color:#92400e'>{esc(card.estimate)}</div>"
    if result and result.error:
        shown = f"<div class='rd-error' style='background:#fee2e2;color:#991b1b;padding:6px;border-radius:6px'>{esc(result.error)}</div>"
    elif result and not answer.strip():
        shown = f"<div class='rd-answer' style='{MUTED};font-style:italic'></div><div style='{MUTED}'>(empty answer: the model stopped at once)</div>"
    else:
        cursor = " ▍" if card.status == "running" else ""
        shown = (f"<div class='rd-answer' style='white-space:pre-wrap;background:#f9fafb;padding:8px;border-radius:6px;"
                 f"min-height:2.5em;margin:6px 0'>{esc(answer)}{cursor}</div>")
    badges = _badges(card) if result and not result.error else ""
    metrics = _metrics_table(result) if result and not result.error else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in (result.notes if result else []) if not (result.error and n == result.error))
    notes = f"<ul class='rd-notes' style='margin:6px 0 0 16px;padding:0;font-size:12px;{MUTED}'>{notes}</ul>" if notes else ""
    return (f"<div class='rd-card' data-method='{esc(card.method)}' data-status='{esc(card.status)}' "
            f"style='{CARD_STYLE};border-left-color:{method_colour(card.method)}'>{head}{shown}{badges}{metrics}{notes}</div>")


BADGE = "display:inline-block;border-radius:10px;padding:1px 8px;margin:0 4px 4px 0;font-size:12px"


def gold_verdict(answer: str, golds: list[str]) -> bool:
    """The bench's containment score: the normalised gold answer appears in the normalised answer."""
    return bool(best_over_golds(contains, answer, golds))


def _badges(card: Card) -> str:
    result, out = card.result, []
    if card.golds:
        if gold_verdict(result.answer, card.golds):
            out.append(f"<span class='rd-gold' data-correct='1' style='{BADGE};background:#dcfce7;color:#166534'"
                       f" title='the answer contains a gold answer'>✓ contains “{esc(card.golds[0])}”</span>")
        else:
            golds = " or ".join(f"“{esc(g)}”" for g in card.golds)
            out.append(f"<span class='rd-gold' data-correct='0' style='{BADGE};background:#fee2e2;color:#991b1b'"
                       f" title='no gold answer in this answer'>✗ gold: {golds}</span>")
    if card.limit and result.new_tokens >= card.limit:
        out.append(f"<span class='rd-cut' style='{BADGE};background:#fef3c7;color:#92400e' title='the answer reached "
                   f"the max new tokens limit and was stopped there'>cut at {card.limit} tokens</span>")
    adapter = adapter_used(card.method, result)
    if adapter is not None:
        out.append(f"<span class='rd-adapter' data-used='{int(adapter)}' style='{BADGE};background:#f3f4f6;color:#374151'"
                   f" title='a LoRA adapter trained on this collection (Library, Fine-tune)'>"
                   f"{'adapter used' if adapter else 'no adapter: none trained for this collection, or lora off'}</span>")
    if result.prepare_s > 0:
        out.append(f"<span class='rd-prepared' style='{BADGE};background:#e0e7ff;color:#3730a3' "
                   f"title='{esc(GLOSSARY['prepare_s'])}'>prepared on first use: {fmt_s(result.prepare_s)}</span>")
    return f"<div class='rd-badges'>{''.join(out)}</div>" if out else ""


def adapter_used(method: str, result: Result) -> bool | None:
    """For a method that can train a per-collection adapter: did this answer read one (its notes say "LoRA
    applied")? None for methods without adapters."""
    cls = registry().get(method)
    if not (cls and cls.has_finetune):
        return None
    return any(re.search(r"\bLoRA\b.*\bapplied\b", note) for note in result.notes)  # lloco's and btr's notes


def _status_text(card: Card) -> str:
    if card.status == "done" and card.result:
        return "error" if card.result.error else f"done in {fmt_s(card.result.total_s)}"
    if card.status == "running":
        return f"running {time.perf_counter() - card.started:.0f} s"
    return "waiting"


def _metrics_table(result: Result) -> str:
    """A two-column grid of label/value pairs (no <table>: themes draw heavy borders on tables). A time measured
    over several runs shows its median with the range under it."""
    cells = "".join(
        f"<div style='display:flex;justify-content:space-between;gap:6px;border-bottom:1px solid #f3f4f6' "
        f"title='{esc(GLOSSARY.get(name, label))}'>"
        f"<span style='{MUTED};border-bottom:1px dotted #9ca3af;cursor:help'>{label}</span><span class='rd-metric' data-metric='{name}' "
        f"data-value='{float(getattr(result, name) or 0)!r}' style='font-variant-numeric:tabular-nums;text-align:right'>"
        f"{fmt(getattr(result, name))}{_time_range(result, name, fmt)}</span></div>"
        for name, label, fmt in METRICS)
    return (f"{_repeats_line(result)}<div class='rd-metrics' style='display:grid;grid-template-columns:1fr 1fr;"
            f"column-gap:14px;row-gap:2px;font-size:12.5px'>{cells}</div>")


def _time_range(result: Result, name: str, fmt) -> str:
    runs = result.timings.get(name) if result.timings.get("repeats", 1) > 1 else None
    if not runs:
        return ""
    return (f"<br><span class='rd-range' style='{MUTED};font-size:11px'>{fmt(min(runs))}–{fmt(max(runs))}"
            "</span>")


def _repeats_line(result: Result) -> str:
    repeats = result.timings.get("repeats", 1)
    if repeats > 1:
        return (f"<div class='rd-repeats' style='{MUTED};font-size:11.5px'>times: median of {repeats} runs "
                "(range under each)</div>")
    return (f"<div class='rd-repeats' style='{MUTED};font-size:11.5px'>times: one run, so one noisy sample "
            "(Repeats gives a median)</div>")
