"""The Sources panel: per method, the passages it read, most similar first, with the sentence most likely to
hold the answer highlighted."""
from __future__ import annotations

import re

from ...methods.base import Result
from ...text import MATCHING_STOPWORDS
from .shared import MUTED, esc


STOPWORDS = MATCHING_STOPWORDS  # ragdemo/text.py says why this list


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
