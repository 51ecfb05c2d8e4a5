"""HTML and charts for the app, as pure functions of `Result` records (testable without a browser).

Every piece of user or model text goes through `esc`: uploaded documents and model output must never render as HTML.
Styles are inline so the fragments look the same in any Gradio theme and in tests.
"""
from __future__ import annotations

import hashlib
import html
import re
import time
from dataclasses import dataclass, field

from ..methods.base import Result

# mark -> (colour, what it means for the model). Unknown marks get a stable colour and their own name.
MARKS = {
    "text": ("#e5e7eb", "plain text: every layer computed now"),
    "cached": ("#bfdbfe", "reused from a cache computed offline"),
    "compressed": ("#ddd6fe", "compressed cache: only some tokens kept"),
    "binarized": ("#fde68a", "stored as binary codes, decoded back to states"),
    "merged": ("#fbcfe8", "merged with similar tokens"),
    "repeated": ("#bbf7d0", "a second copy (JRT reads the context twice)"),
    "retrieved": ("#fed7aa", "retrieved during generation (RETRO)"),
}
_SPARE_COLOURS = ["#a5f3fc", "#fecaca", "#d9f99d", "#c7d2fe", "#fef08a", "#e9d5ff"]
MAX_TOKENS_SHOWN = 240  # per segment; the middle of longer segments is elided so pages stay light

CARD_STYLE = ("flex:1 1 280px;min-width:260px;max-width:520px;border:1px solid #d1d5db;border-radius:10px;"
              "padding:12px;background:#ffffff;color:#111827;font-size:14px;line-height:1.4")
MUTED = "color:#6b7280"


def esc(text) -> str:
    return html.escape(str(text if text is not None else ""), quote=True)


def mark_colour(mark: str) -> str:
    if mark in MARKS:
        return MARKS[mark][0]
    digest = int(hashlib.sha1(mark.encode()).hexdigest(), 16)
    return _SPARE_COLOURS[digest % len(_SPARE_COLOURS)]


def mark_meaning(mark: str) -> str:
    return MARKS.get(mark, ("", mark))[1]


def fmt_bytes(n: float) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_s(seconds: float) -> str:
    seconds = float(seconds or 0)
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_num(value: float) -> str:
    value = float(value or 0)
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


# ------------------------------------------------------------------ cards
@dataclass
class Card:
    """One method's card while a comparison runs: waiting, running (streaming text), then done."""

    method: str
    label: str
    status: str = "waiting"  # waiting | running | done
    text: str = ""
    result: Result | None = None
    started: float = field(default_factory=time.perf_counter)

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
    ("bytes_per_token", "bytes/token", lambda v: f"{float(v or 0):.1f}"),
]


def render_cards(cards: list[Card]) -> str:
    if not cards:
        return f"<div style='{MUTED}'>Pick methods and press Compare: each method's answer and costs appear here.</div>"
    body = "".join(render_card(c) for c in cards)
    return f"<div class='rd-cards' style='display:flex;flex-wrap:wrap;gap:12px;align-items:stretch'>{body}</div>"


def render_card(card: Card) -> str:
    result = card.result
    answer = result.answer if result else card.text
    head = (f"<div style='display:flex;justify-content:space-between;gap:8px'><b>{esc(card.label)}</b>"
            f"<span style='{MUTED};font-size:12px'>{esc(card.method)} · {esc(_status_text(card))}</span></div>")
    if result and result.error:
        shown = f"<div class='rd-error' style='background:#fee2e2;color:#991b1b;padding:6px;border-radius:6px'>{esc(result.error)}</div>"
    elif result and not answer.strip():
        shown = f"<div class='rd-answer' style='{MUTED};font-style:italic'></div><div style='{MUTED}'>(empty answer: the model stopped at once)</div>"
    else:
        cursor = " ▍" if card.status == "running" else ""
        shown = (f"<div class='rd-answer' style='white-space:pre-wrap;background:#f9fafb;padding:8px;border-radius:6px;"
                 f"min-height:2.5em;margin:6px 0'>{esc(answer)}{cursor}</div>")
    metrics = _metrics_table(result) if result and not result.error else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in (result.notes if result else []) if not (result.error and n == result.error))
    notes = f"<ul class='rd-notes' style='margin:6px 0 0 16px;padding:0;font-size:12px;{MUTED}'>{notes}</ul>" if notes else ""
    return (f"<div class='rd-card' data-method='{esc(card.method)}' data-status='{esc(card.status)}' style='{CARD_STYLE}'>"
            f"{head}{shown}{metrics}{notes}</div>")


def _status_text(card: Card) -> str:
    if card.status == "done" and card.result:
        return "error" if card.result.error else f"done in {fmt_s(card.result.total_s)}"
    if card.status == "running":
        return f"running {time.perf_counter() - card.started:.0f} s"
    return "waiting"


def _metrics_table(result: Result) -> str:
    """A two-column grid of label/value pairs (no <table>: themes draw heavy borders on tables)."""
    cells = "".join(
        f"<div style='display:flex;justify-content:space-between;gap:6px;border-bottom:1px solid #f3f4f6'>"
        f"<span style='{MUTED}'>{label}</span><span class='rd-metric' data-metric='{name}' "
        f"data-value='{float(getattr(result, name) or 0)!r}' style='font-variant-numeric:tabular-nums'>"
        f"{fmt(getattr(result, name))}</span></div>"
        for name, label, fmt in METRICS)
    return (f"<div class='rd-metrics' style='display:grid;grid-template-columns:1fr 1fr;column-gap:14px;row-gap:2px;"
            f"font-size:12.5px'>{cells}</div>")


# --------------------------------------------------------- what the model sees
def render_legend(marks: list[str] | None = None) -> str:
    shown = list(MARKS) + [m for m in (marks or []) if m not in MARKS]
    items = "".join(
        f"<span style='display:inline-flex;align-items:center;gap:4px;margin-right:12px'>"
        f"<span style='display:inline-block;width:14px;height:14px;border-radius:3px;background:{mark_colour(m)}'></span>"
        f"<b>{esc(m)}</b><span style='{MUTED}'>{esc(mark_meaning(m))}</span></span>"
        for m in shown)
    return f"<div class='rd-legend' style='font-size:12px;margin:6px 0;line-height:2'>{items}</div>"


def render_model_sees(results: list[Result], labels: dict[str, str] | None = None, tokenizer=None) -> str:
    """The prompt of each method as the model receives it, coloured by how each segment reaches the model."""
    results = [r for r in results if r.segments or r.events or r.error]
    if not results:
        return f"<div style='{MUTED}'>After a comparison, this shows each method's prompt token by token.</div>"
    marks = sorted({s.get("mark", "text") for r in results for s in r.segments})
    blocks = "".join(_sees_block(r, (labels or {}).get(r.method, r.method), tokenizer) for r in results)
    return (f"<div class='rd-sees-all' style='color:#111827'>{render_legend(marks)}"
            f"<div style='display:flex;flex-direction:column;gap:12px'>{blocks}</div></div>")


def _sees_block(result: Result, label: str, tokenizer) -> str:
    total = sum(int(s.get("n_tokens", 0)) for s in result.segments) or 1
    by_mark: dict[str, int] = {}
    for s in result.segments:
        by_mark[s.get("mark", "text")] = by_mark.get(s.get("mark", "text"), 0) + int(s.get("n_tokens", 0))
    summary = " · ".join(f"{esc(m)} {n}" for m, n in by_mark.items())
    bar = "".join(
        f"<div title='{esc(m)}: {n} tokens' style='width:{100 * n / total:.2f}%;background:{mark_colour(m)}'></div>"
        for m, n in by_mark.items())
    segments = "".join(_segment_html(s, tokenizer) for s in result.segments)
    events = _events_html(result.events)
    error = f"<div style='color:#991b1b'>{esc(result.error)}</div>" if result.error else ""
    return (f"<div class='rd-sees' data-method='{esc(result.method)}' style='border:1px solid #e5e7eb;border-radius:8px;"
            f"padding:10px;background:#ffffff'>"
            f"<div><b>{esc(label)}</b> <span style='{MUTED}'>{sum(by_mark.values())} prompt tokens: {summary}</span></div>"
            f"<div style='display:flex;height:10px;border-radius:4px;overflow:hidden;margin:6px 0;background:#f3f4f6'>{bar}</div>"
            f"{error}<div style='font-family:ui-monospace,monospace;font-size:12px;line-height:1.8;max-height:320px;"
            f"overflow:auto'>{segments}</div>{events}</div>")


def _segment_html(segment: dict, tokenizer) -> str:
    mark, kind = segment.get("mark", "text"), segment.get("kind", "")
    n = int(segment.get("n_tokens", 0))
    source = segment.get("source") or {}
    where = f" from {source.get('doc')}" if source.get("doc") else ""
    title = f"{kind} · {mark} · {n} tokens{where}"
    tag = (f"<span style='font-size:10px;font-family:sans-serif;background:#374151;color:#fff;border-radius:3px;"
           f"padding:0 4px;margin-right:3px'>{esc(kind)}{' · ' + esc(mark) if mark != 'text' else ''}</span>")
    return (f"<span class='rd-seg' data-mark='{esc(mark)}' title='{esc(title)}' style='background:{mark_colour(mark)};"
            f"border-radius:3px;padding:1px 0'>{tag}{_tokens_html(segment.get('text', ''), tokenizer)}</span>")


def _tokens_html(text: str, tokenizer) -> str:
    """Token boundaries drawn as thin separators, so a student sees tokens, not characters."""
    if tokenizer is None:
        return _visible_whitespace(esc(text))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    if len(pieces) > MAX_TOKENS_SHOWN:
        half = MAX_TOKENS_SHOWN // 2
        hidden = len(pieces) - 2 * half
        pieces = pieces[:half] + [None] + pieces[-half:]
    else:
        hidden = 0
    out = []
    for piece in pieces:
        if piece is None:
            out.append(f"<span style='{MUTED};font-style:italic'> … {hidden} more tokens … </span>")
        else:
            out.append(f"<span style='border-right:1px solid rgba(0,0,0,.18)'>{_visible_whitespace(esc(piece))}</span>")
    return "".join(out)


def _visible_whitespace(escaped: str) -> str:
    return escaped.replace("\n", "<span style='opacity:.45'>↵</span><br>")


def _events_html(events: list[dict]) -> str:
    if not events:
        return ""
    items = "".join(f"<li>{_event_text(e)}</li>" for e in events)
    return (f"<div class='rd-events' style='font-size:12px;margin-top:6px'><b>Events during generation</b>"
            f"<ol style='margin:2px 0 0 18px;padding:0'>{items}</ol></div>")


def _event_text(event: dict) -> str:
    return " · ".join(f"<span style='{MUTED}'>{esc(k)}</span> {esc(_short(v))}" for k, v in event.items())


def _short(value, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- sources
STOPWORDS = set("""a an and are as at be by did do does for from had has have how i in is it its of on or that the their
this to was were what when where which who whom why will with you your""".split())


def terms(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences end at . ! ? before whitespace, or at a line break ("a.txt" and "3.5" stay whole)."""
    cuts = [0] + [m.end() for m in re.finditer(r"[.!?](?=\s)|\n", text)] + [len(text)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def highlight_match(text: str, query: str) -> str:
    """Escaped `text` with the sentence that best matches `query` (question + answer words) in <mark>."""
    wanted = terms(query)
    spans = sentence_spans(text)
    best, best_score = None, 0
    for start, end in spans:
        score = len(terms(text[start:end]) & wanted)
        if score > best_score:
            best, best_score = (start, end), score
    if best is None:
        return esc(text)
    start, end = best
    return (esc(text[:start]) + "<mark class='rd-match' style='background:#fef08a;color:#111827'>" + esc(text[start:end])
            + "</mark>" + esc(text[end:]))


def source_chunk_ids(source: dict) -> list[int]:
    return [int(i) for i in (source.get("chunk_ids") or [source.get("chunk_id")]) if i is not None]


def source_text(source: dict, result: Result, chunk_texts: dict[int, str]) -> str:
    """The stored chunk text; for sources without chunks (a whole document), the passage as the method read it."""
    ids = source_chunk_ids(source)
    if ids:
        return "".join(chunk_texts.get(i, "") for i in ids)
    return "".join(s.get("text", "") for s in result.segments if s.get("source") == source and s.get("mark") != "repeated")


def render_sources(results: list[Result], chunk_texts: dict[int, str], question: str,
                   labels: dict[str, str] | None = None) -> str:
    """Per method, the passages it read, with the sentence matching the question and its answer highlighted.
    The best-scoring passage of each method is open; the others unfold on click."""
    blocks = []
    for result in results:
        if not result.sources:
            continue
        label = (labels or {}).get(result.method, result.method)
        best = max(range(len(result.sources)), key=lambda i: float(result.sources[i].get("score") or 0))
        items = []
        for index, source in enumerate(result.sources):
            ids = source_chunk_ids(source)
            text = source_text(source, result, chunk_texts)
            where = f"chunks {', '.join(map(str, ids))}" if ids else "whole document"
            score = f" · score {float(source['score']):.3f}" if source.get("score") is not None else ""
            body = (highlight_match(text, f"{question} {result.answer}") if text
                    else f"<i style='{MUTED}'>no longer stored</i>")
            items.append(f"<details class='rd-source'{' open' if index == best else ''}><summary>"
                         f"{esc(source.get('doc', '?'))} · {esc(where)}{score}</summary>"
                         f"<div style='white-space:pre-wrap;font-size:13px;padding:6px;background:#f9fafb;max-height:240px;"
                         f"overflow:auto'>{body}</div></details>")
        blocks.append(f"<div data-method='{esc(result.method)}' style='margin-bottom:8px'><b>{esc(label)}</b>"
                      f" <span style='{MUTED}'>{len(result.sources)} sources</span>{''.join(items)}</div>")
    if not blocks:
        return f"<div style='{MUTED}'>No method in the last comparison read any document passage.</div>"
    return f"<div class='rd-sources' style='color:#111827'>{''.join(blocks)}</div>"


# ------------------------------------------------------------------ chart
def comparison_figure(results: list[Result], labels: dict[str, str] | None = None):
    """TTFT, tokens and storage per method as three bar panels; None when nothing ran."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe inside the server

    done = [r for r in results if not r.error]
    if not done:
        return None
    names = [(labels or {}).get(r.method, r.method) for r in done]
    x = list(range(len(done)))
    figure = Figure(figsize=(11, 3.2), dpi=100, layout="constrained")
    ttft, tokens, storage = figure.subplots(1, 3)
    ttft.bar(x, [r.ttft_s for r in done], color="#6366f1")
    ttft.set_title("time to first token (s)")
    width = 0.27
    for offset, (field_name, colour) in zip((-width, 0, width), (("prompt_tokens", "#9ca3af"),
                                                                 ("processed_tokens", "#f59e0b"),
                                                                 ("cached_tokens", "#3b82f6"))):
        tokens.bar([i + offset for i in x], [getattr(r, field_name) for r in done], width, color=colour,
                   label=field_name.replace("_tokens", ""))
    tokens.set_title("tokens")
    tokens.legend(fontsize=8)
    storage.bar(x, [r.storage_bytes for r in done], color="#10b981")
    storage.set_title("storage read (bytes)")
    storage.set_ylim(bottom=0, top=max(1, max(r.storage_bytes for r in done)) * 1.1)
    for axis in (ttft, tokens, storage):
        axis.set_xticks(x, names, rotation=20, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    return figure


# ------------------------------------------------------------------ tables
def history_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        r = run["result"]
        rows.append([time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"])), run["question"], run["method"],
                     run["model"], _short(r.get("error") or r.get("answer", ""), 120), r.get("prompt_tokens", 0),
                     round(float(r.get("ttft_s", 0)), 3), round(float(r.get("total_s", 0)), 3), r.get("storage_bytes", 0)])
    return rows


HISTORY_HEADERS = ["time", "question", "method", "model", "answer", "prompt tokens", "TTFT s", "total s", "storage B"]


def document_table(docs: list[dict], methods: list[str] = ()) -> tuple[list[str], list[list]]:
    """Headers and rows: one storage column per method in `methods` (those with offline artifacts) and per
    method that has cached artifacts for any document."""
    methods = list(methods) + sorted({m for d in docs for m in d.get("storage", {})} - set(methods))
    headers = ["id", "name", "tokens", "chunks", "size"] + [f"{m} storage" for m in methods]
    rows = [[d["id"], d["name"], d["n_tokens"], d["n_chunks"], fmt_bytes(d["size"])]
            + [fmt_bytes(d.get("storage", {}).get(m, 0)) for m in methods] for d in docs]
    return headers, rows
