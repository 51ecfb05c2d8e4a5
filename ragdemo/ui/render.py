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

from ..bench.metrics import best_over_golds, contains
from ..cards import card_text
from ..methods import registry
from ..glossary import FIELDS
from ..machine import CpuShare
from ..methods.base import GLOSSARY, Result
from ..units import fmt_bytes, fmt_s

# mark -> (colour, what it means for the model). Unknown marks get a stable colour and their own name.
MARKS = {
    "text": ("#e5e7eb", "plain text: every layer computed now"),
    "cached": ("#bfdbfe", "reused from a cache computed offline"),
    "compressed": ("#ddd6fe", "compressed cache: only some tokens kept"),
    "binarized": ("#fde68a", "stored as binary codes, decoded back to states"),
    "merged": ("#fbcfe8", "merged with similar tokens"),
    "repeated": ("#bbf7d0", "a second copy (JRT reads the context twice)"),
    "retrieved": ("#fed7aa", "retrieved during generation (RETRO)"),
    "pruned": ("#fecdd3", "compressed as text: predictable tokens dropped (struck through), the rest read"),
}
_SPARE_COLOURS = ["#a5f3fc", "#fecaca", "#d9f99d", "#c7d2fe", "#fef08a", "#e9d5ff"]
MAX_TOKENS_SHOWN = 240  # per segment; the middle of longer segments is elided so pages stay light

# A grid, not a flex row: every card has the same width whatever the row (flex stretched the last row's cards).
CARDS_STYLE = "display:grid;grid-template-columns:repeat(auto-fit,minmax(290px,1fr));gap:12px;align-items:stretch"
CARD_STYLE = ("border:1px solid #d1d5db;border-left-width:6px;border-radius:10px;padding:12px;background:#ffffff;"
              "color:#111827;font-size:14px;line-height:1.4;min-width:0")

# One colour per method, shared by its card, its chart bars and its "what the model sees" block.
METHOD_PALETTE = ["#6b7280", "#dc2626", "#2563eb", "#0891b2", "#16a34a", "#ca8a04", "#9333ea", "#db2777",
                  "#ea580c", "#4f46e5", "#0d9488", "#65a30d"]

# What each method does, in one line a newcomer can read on its card (the Methods tab has the details).
ONE_LINERS = {
    "closed_book": "No documents: the model answers from what it learned in training.",
    "full_context": "Every document pasted before the question: the quality reference and the cost ceiling.",
    "rag": "The k chunks nearest the question are retrieved and read as text.",
    "jrt": "Retrieved passages read twice, question first, so the second reading knows what matters.",
    "retro": "Retrieves neighbours for the question, then again from the answer every few tokens while writing.",
    "btr": "Passages stored as 1-bit codes of their layer states; only the upper layers run at question time.",
    "lloco": "Passages stored as compressed KV caches (1 token in c kept), read with a distilled adapter when "
             "one was trained (the card says so).",
    "cacheblend": "Stored KV caches of each chunk reused; only the tokens that need it are recomputed.",
    "lingua": "Passages compressed by dropping the tokens a small LM finds predictable, then read as text.",
}
MUTED = "color:#6b7280"


def esc(text) -> str:
    return html.escape(str(text if text is not None else ""), quote=True)


def mark_colour(mark: str) -> str:
    if mark in MARKS:
        return MARKS[mark][0]
    return stable_pick(mark, _SPARE_COLOURS)


def mark_meaning(mark: str) -> str:
    return MARKS.get(mark, ("", mark))[1]


def method_colour(method: str) -> str:
    """Stable per method: registry position, and a hash for names outside the registry (e.g. bench variants)."""
    names = list(registry())
    base = method.split("@")[0]
    if base in names:
        return METHOD_PALETTE[names.index(base) % len(METHOD_PALETTE)]
    return stable_pick(base, METHOD_PALETTE)


def stable_pick(name: str, choices):
    """The same choice for a name in every process and session (Python's own hash() is salted per process)."""
    return choices[int(hashlib.sha1(name.encode()).hexdigest(), 16) % len(choices)]


def one_liner(method: str) -> str:
    cls = registry().get(method)
    summary = getattr(cls, "summary", "") if cls else ""
    if summary or method in ONE_LINERS:
        return summary or ONE_LINERS[method]
    card = re.sub(r"^#+.*\n", "", card_text(method) if cls else "").strip()
    first = re.split(r"(?<=[.!?])\s", re.sub(r"[*`]", "", card), maxsplit=1)[0]
    return _short(first, 140)


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


def segment_share(segment: dict) -> float:
    """What a segment adds to the prompt, in token-layers / layers (its processed + cached share); a segment
    view without shares (an old run) counts its tokens."""
    if "processed" in segment or "cached" in segment:
        return float(segment.get("processed") or 0) + float(segment.get("cached") or 0)
    return float(segment.get("n_tokens", 0))


def _sees_block(result: Result, label: str, tokenizer) -> str:
    """One method's prompt. The totals are the answer's own fields (the card shows the same numbers); the
    per-mark split and the bar add up the segments' shares, which sum to the same total."""
    by_mark: dict[str, float] = {}
    for s in result.segments:
        by_mark[s.get("mark", "text")] = by_mark.get(s.get("mark", "text"), 0.0) + segment_share(s)
    total = sum(by_mark.values()) or 1.0
    summary = " · ".join(f"{esc(m)} {fmt_num(n)}" for m, n in by_mark.items())
    bar = "".join(
        f"<div title='{esc(m)}: {fmt_num(n)} tokens' style='width:{100 * n / total:.2f}%;background:{mark_colour(m)}'></div>"
        for m, n in by_mark.items())
    segments = "".join(_segment_html(s, tokenizer) for s in result.segments)
    events = _events_html(result.events)
    error = f"<div style='color:#991b1b'>{esc(result.error)}</div>" if result.error else ""
    totals = (f"<span class='rd-sees-total' data-prompt='{float(result.prompt_tokens)!r}' "
              f"data-processed='{float(result.processed_tokens)!r}' data-cached='{float(result.cached_tokens)!r}' "
              f"title='{esc(FIELDS['prompt_tokens'])}'>{fmt_num(result.prompt_tokens)} prompt tokens "
              f"({fmt_num(result.processed_tokens)} computed now, {fmt_num(result.cached_tokens)} read from a cache)</span>")
    return (f"<div class='rd-sees' data-method='{esc(result.method)}' style='border:1px solid #e5e7eb;border-radius:8px;"
            f"border-left:6px solid {method_colour(result.method)};padding:10px;background:#ffffff'>"
            f"<div><b>{esc(label)}</b> <span style='{MUTED}'>{totals}: {summary}{_kept_summary(result.segments)}</span></div>"
            f"<div style='display:flex;height:10px;border-radius:4px;overflow:hidden;margin:6px 0;background:#f3f4f6'>{bar}</div>"
            f"{error}<div style='font-family:ui-monospace,monospace;font-size:12px;line-height:1.8;max-height:320px;"
            f"overflow:auto'>{segments}</div>{events}</div>")


def kept_share(segments: list[dict]) -> tuple[float, int]:
    """(passage tokens kept, passage tokens shown) over the segments that mark what they keep: each token counts
    the share of layers x KV heads that kept it (1 or 0 for text compression), as the method's note counts."""
    marked = [float(k) for s in segments for k in (s.get("keep") or [])]
    return sum(marked), len(marked)


def _kept_summary(segments: list[dict]) -> str:
    kept, shown = kept_share(segments)
    if not shown:
        return ""
    return (f" · <span class='rd-kept-total' data-kept='{kept!r}'>{fmt_num(kept)} of {shown} compressed tokens kept"
            "</span> (averaged over layers and KV heads where they differ; dropped ones struck through)")


def _kept_tokens_html(tokens: list[str], keep: list[float]) -> str:
    """Each token as the model reads it: dropped tokens dimmed and struck through (LLMLingua demo style)."""
    out = []
    for piece, share in zip(tokens, keep):
        style = ("border-right:1px solid rgba(0,0,0,.18)" if share >= 0.5
                 else "opacity:.35;text-decoration:line-through;border-right:1px solid rgba(0,0,0,.1)")
        out.append(f"<span class='{'rd-kept' if share >= 0.5 else 'rd-dropped'}' title='kept by {share:.0%} of heads'"
                   f" style='{style}'>{_visible_whitespace(esc(piece))}</span>")
    return "".join(out)


def _segment_html(segment: dict, tokenizer) -> str:
    mark, kind = segment.get("mark", "text"), segment.get("kind", "")
    n = int(segment.get("n_tokens", 0))
    source = segment.get("source") or {}
    where = f" from {source.get('doc')}" if source.get("doc") else ""
    title = f"{kind} · {mark} · {n} tokens{where}"
    tag = (f"<span style='font-size:10px;font-family:sans-serif;background:#374151;color:#fff;border-radius:3px;"
           f"padding:0 4px;margin-right:3px'>{esc(kind)}{' · ' + esc(mark) if mark != 'text' else ''}</span>")
    return (f"<span class='rd-seg' data-mark='{esc(mark)}' title='{esc(title)}' style='background:{mark_colour(mark)};"
            f"border-radius:3px;padding:1px 0'>{tag}{_segment_tokens(segment, tokenizer)}</span>")


def _segment_tokens(segment: dict, tokenizer) -> str:
    if segment.get("tokens") and segment.get("keep"):
        return _kept_tokens_html(segment["tokens"], segment["keep"])
    return _tokens_html(segment.get("text", ""), tokenizer)


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


# An event's keys in plain words (RETRO's re-retrievals, and whatever a method adds later). A key not listed
# still reads: "prefilled_tokens" shows as "prefilled 200 tokens", "load_s" as "load time 2 ms", "doc_ids" as "docs".
EVENT_WORDS = {"kind": "", "action": "", "step": "after answer token", "query": "searched with",
               "chunk_ids": "neighbour chunks", "continuation_ids": "their continuation chunks",
               "changed": "neighbours changed", "context_tokens": "context now", "retrieve_s": "search took"}
EVENT_KINDS = {"question": "Retrieval for the question", "re-retrieval": "Re-retrieval while answering"}


def _event_text(event: dict) -> str:
    """One event as a sentence: what happened first, then its figures with plain labels."""
    title = EVENT_KINDS.get(str(event.get("kind", "")), str(event.get("kind", "")).replace("_", " ").capitalize())
    action = event.get("action")
    head = f"<b>{esc(title)}</b>" + (f": {esc(_short(action))}" if action else "")
    parts = [f"<span style='{MUTED}'>{esc(_event_label(k))}</span> {esc(_event_value(k, v))}"
             for k, v in event.items() if k not in ("kind", "action")]
    return head + (" · " + " · ".join(parts) if parts else "")


def _event_label(key: str) -> str:
    if key in EVENT_WORDS:
        return EVENT_WORDS[key]
    for suffix, replacement in (("_ids", "s"), ("_s", " time"), ("_tokens", "")):  # "_tokens": the value says it
        if key.endswith(suffix):
            return (key[: -len(suffix)] + replacement).replace("_", " ")
    return key.replace("_", " ")


def _event_value(key: str, value) -> str:
    if key.endswith("_s") and isinstance(value, (int, float)):
        return fmt_s(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    if key.endswith("_tokens") and isinstance(value, (int, float)):
        return f"{fmt_num(value)} tokens"
    if key == "query":
        return f"“{_short(value, 80)}”"
    return _short(value)


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


ANSWER_WEIGHT = 3  # an answer word in a sentence counts this many question words: the answer is what is sought
GOLD_BONUS = 10  # a sentence holding a gold answer verbatim is the one to show


def highlight_match(text: str, question: str, answer: str = "", golds: list[str] = ()) -> str:
    """Escaped `text` with the sentence most likely to hold the answer in <mark>: words of the answer (and of
    the gold answers, when known) weigh more than words of the question, which a passage often repeats
    around the answer rather than in its sentence."""
    asked = terms(question)
    sought = terms(" ".join([answer, *golds])) - asked
    spans = sentence_spans(text)
    best, best_score = None, 0
    for start, end in spans:
        sentence = text[start:end]
        words = terms(sentence)
        score = ANSWER_WEIGHT * len(words & sought) + len(words & asked)
        score += GOLD_BONUS * any(g.strip() and g.strip().lower() in sentence.lower() for g in golds)
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


SIMILARITY_HELP = ("similarity: the cosine of the angle between the question's and the passage's MiniLM embeddings "
                   "(1 = pointing the same way, 0 = unrelated); retrieval took the highest")


def render_sources(results: list[Result], chunk_texts: dict[int, str], question: str,
                   labels: dict[str, str] | None = None, golds: list[str] = ()) -> str:
    """Per method, the passages it read, most similar to the question first, with the sentence most likely to
    hold the answer highlighted. The most similar passage of each method is open; the others unfold on click."""
    blocks = []
    for result in results:
        if not result.sources:
            continue
        label = (labels or {}).get(result.method, result.method)
        ranked = sorted(result.sources, key=lambda s: (s.get("score") is None, -float(s.get("score") or 0)))
        items = []
        for index, source in enumerate(ranked):
            ids = source_chunk_ids(source)
            text = source_text(source, result, chunk_texts)
            where = (f"chunk{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}" if ids else "whole document")
            score = (f" · <span class='rd-similarity' title='{esc(SIMILARITY_HELP)}' style='border-bottom:1px dotted "
                     f"#9ca3af;cursor:help'>similarity {float(source['score']):.2f}</span>"
                     if source.get("score") is not None else "")
            body = (highlight_match(text, question, result.answer, golds) if text
                    else f"<i style='{MUTED}'>no longer stored</i>")
            items.append(f"<details class='rd-source'{' open' if index == 0 else ''}><summary>"
                         f"{esc(source.get('doc', '?'))} · {esc(where)}{score}</summary>"
                         f"<div style='white-space:pre-wrap;font-size:13px;padding:6px;background:#f9fafb;max-height:240px;"
                         f"overflow:auto'>{body}</div></details>")
        count = len(result.sources)
        blocks.append(f"<div data-method='{esc(result.method)}' style='margin-bottom:8px'><b>{esc(label)}</b>"
                      f" <span style='{MUTED}'>{count} source{'s' if count != 1 else ''}</span>{''.join(items)}</div>")
    if not blocks:
        return f"<div style='{MUTED}'>No method in the last comparison read any document passage.</div>"
    return f"<div class='rd-sources' style='color:#111827'>{''.join(blocks)}</div>"


# ------------------------------------------------------------------ chart
def comparison_figure(results: list[Result], labels: dict[str, str] | None = None,
                      storage: dict[str, tuple[int, int]] | None = None):
    """Three panels sharing one row per method (horizontal bars, names once on the left, so they never overlap
    and the figure stays readable at 800 px): TTFT on a log scale, tokens, storage split per-chunk/shared.
    `storage` is {method: (per-chunk bytes, shared bytes)} from each method's storage account. None when
    nothing ran."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe inside the server
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    done = [r for r in results if not r.error]
    if not done:
        return None
    names = [_wrap((labels or {}).get(r.method, r.method)) for r in done]
    y = list(range(len(done)))[::-1]  # first method on top
    colours = [method_colour(r.method) for r in done]
    figure = Figure(figsize=(10, 1.3 + 0.55 * len(done)), dpi=100, layout="constrained")
    ttft, tokens, stored = figure.subplots(1, 3, sharey=True)
    spread = [r.timings.get("ttft_s") if r.timings.get("repeats", 1) > 1 else None for r in done]
    ranges = [[r.ttft_s - min(runs) if runs else 0 for r, runs in zip(done, spread)],
              [max(runs) - r.ttft_s if runs else 0 for r, runs in zip(done, spread)]]
    ttft.barh(y, [max(r.ttft_s, 1e-3) for r in done], color=colours,
              xerr=ranges if any(spread) else None, capsize=3, error_kw={"elinewidth": 1})  # the runs' range
    ttft.set_xscale("log")
    ttft.set_title("time to first token (log scale" + ("; median and range of the runs)" if any(spread) else ")"),
                   fontsize=10)
    ttft.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_s(v)))
    ttft.xaxis.set_minor_formatter(NullFormatter())  # "2 x 10^0" minor labels overlap at 800 px
    for yi, r in zip(y, done):
        ttft.text(max(r.ttft_s, 1e-3), yi, " " + fmt_s(r.ttft_s), va="center", fontsize=8)
    ttft.set_xlim(right=max(r.ttft_s for r in done) * 8)
    height = 0.27
    for offset, (field_name, shade) in zip((height, 0, -height), (("prompt_tokens", "#9ca3af"),
                                                                 ("processed_tokens", "#f59e0b"),
                                                                 ("cached_tokens", "#3b82f6"))):
        tokens.barh([v + offset for v in y], [getattr(r, field_name) for r in done], height, color=shade,
                    label=field_name.replace("_tokens", ""))
    tokens.set_title("tokens", fontsize=10)
    tokens.legend(fontsize=7, loc="best")
    parts = [(storage or {}).get(r.method, (r.storage_bytes, 0)) for r in done]
    stored.barh(y, [c for c, _ in parts], color=colours, label="per-chunk")
    stored.barh(y, [s_ for _, s_ in parts], left=[c for c, _ in parts], color=colours, hatch="//", alpha=0.45,
                label="shared (decoder, adapter…)")
    stored.set_title("stored for the collection", fontsize=10)
    stored.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
    most = max(c + s_ for c, s_ in parts)
    stored.set_xlim(left=0, right=max(1, most) * 1.15)
    if most:
        stored.legend(fontsize=7, loc="best")
    else:  # nothing stored by any of these methods: say so instead of an axis of "0 B" ticks
        stored.xaxis.set_major_locator(NullLocator())
        stored.text(0.5, 0.5, "nothing stored:\nthese methods read text", transform=stored.transAxes,
                    ha="center", va="center", fontsize=9, color="#6b7280")
    ttft.set_yticks(y, names, fontsize=9)
    for axis in (tokens, stored) if most else (tokens,):
        axis.xaxis.set_major_locator(MaxNLocator(4))  # few ticks: labels stay apart at 800 px
    for axis in (ttft, tokens, stored):
        axis.grid(axis="x", alpha=0.3)
        axis.tick_params(axis="x", labelsize=8)
    return figure


def _wrap(label: str, width: int = 18) -> str:
    words, lines = label.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) > width:
            lines.append("")
        lines[-1] = (lines[-1] + " " + word).strip()
    return "\n".join(lines[:3])


# ------------------------------------------------------------------ tables
def history_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        r = run["result"]
        rows.append([time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"])), run["question"], run["method"],
                     _knob_text(r.get("params")), run["model"], _short(r.get("error") or r.get("answer", ""), 120),
                     r.get("prompt_tokens", 0), fmt_s(r.get("ttft_s", 0)), fmt_s(r.get("total_s", 0)),
                     fmt_bytes(r.get("storage_bytes", 0))])
    return rows


def _knob_text(params) -> str:
    """The knobs that differed from the method's defaults: "k=1, max_new_tokens=32" (wraps at the spaces)."""
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items()) if isinstance(params, dict) else ""


HISTORY_HEADERS = ["time", "question", "method", "knobs", "model", "answer", "prompt tokens", "TTFT", "total", "storage read"]
HISTORY_WIDTHS = ["9%", "15%", "8%", "14%", "10%", "20%", "6%", "6%", "6%", "6%"]


SHARED_ROW = "(shared by all documents)"  # the collection-level row: decoders, codebooks, adapters


def document_table(docs: list[dict], methods: list[str] = (), shared: dict[str, int] | None = None
                   ) -> tuple[list[str], list[list]]:
    """Headers and rows: one storage column per method in `methods` (those with offline artifacts) and per
    method that has cached artifacts for any document or the collection. A last row holds the collection-level
    bytes (`shared`) when there are any, so every method's column adds up to all it keeps."""
    shared = {m: b for m, b in (shared or {}).items() if b}
    methods = list(methods) + sorted(({m for d in docs for m in d.get("storage", {})} | set(shared)) - set(methods))
    headers = ["id", "name", "tokens", "chunks", "size"] + [f"{m} storage" for m in methods]
    rows = [[d["id"], d["name"], d["n_tokens"], d["n_chunks"], fmt_bytes(d["size"])]
            + [fmt_bytes(d.get("storage", {}).get(m, 0)) for m in methods] for d in docs]
    if docs and shared:
        rows.append(["", SHARED_ROW, "", "", ""] + [fmt_bytes(shared.get(m, 0)) for m in methods])
    return headers, rows
