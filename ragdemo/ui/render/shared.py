"""What every fragment of the app's HTML shares: escaping, the mark and method colours, number and text
shortening (each method's one-liner is the cards' own: ragdemo.cards.one_liner)."""
from __future__ import annotations

import hashlib
import html

from ...methods import registry

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

# One colour per method, shared by its card, its chart bars and its "what the model sees" block.
METHOD_PALETTE = ["#6b7280", "#dc2626", "#2563eb", "#0891b2", "#16a34a", "#ca8a04", "#9333ea", "#db2777",
                  "#ea580c", "#4f46e5", "#0d9488", "#65a30d"]

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


def fmt_num(value: float) -> str:
    value = float(value or 0)
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def short(value, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
