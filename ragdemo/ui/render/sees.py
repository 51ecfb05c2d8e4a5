"""The "what the model sees" panel: each method's prompt token by token, coloured by how each segment reaches
the model (text, cached, compressed, ...), with its totals and the events during generation."""
from __future__ import annotations

from ...glossary import FIELDS
from ...methods.base import Result
from ...units import fmt_s
from .shared import MARKS, MUTED, esc, fmt_num, mark_colour, mark_meaning, method_colour, short


MAX_TOKENS_SHOWN = 240  # per segment; the middle of longer segments is elided so pages stay light


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
    head = f"<b>{esc(title)}</b>" + (f": {esc(short(action))}" if action else "")
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
        return f"“{short(value, 80)}”"
    return short(value)
