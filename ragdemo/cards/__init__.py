"""What screens say about each method: its card (the mechanism, from cards/text/NAME.md) and what was
measured (always from the one results suite). The Methods tab, the CLI's `methods` command and the README's
generated tables use these functions, and nothing else reads the cards' text or the results."""
from __future__ import annotations

import functools
import re
from pathlib import Path

from ..methods import registry
from .measured import headline, headline_table, measured_section
from .scaling import scaling_figure, where_each_method_wins, win_sentences
from .suite import Suite, load_suite

FIGURES = ("squad/quality_vs_ttft.png", "squad/storage.png")  # the suite's plots shown under the cards
CARD_TEXT = Path(__file__).parent / "text"  # one markdown file per method, named after it


@functools.lru_cache(maxsize=None)
def card_text(name: str) -> str:
    """A method's card text (markdown: paper, mechanism, what is exact and what approximated), read once from
    cards/text/NAME.md; "" for a method without one."""
    path = CARD_TEXT / f"{name}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


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


def one_liner(method: str) -> str:
    """The line under a method's name on its answer card: ONE_LINERS, else the first sentence of its card text."""
    if method in ONE_LINERS:
        return ONE_LINERS[method]
    card = re.sub(r"^#+.*\n", "", card_text(method.split("@")[0])).strip()
    first = re.split(r"(?<=[.!?])\s", re.sub(r"[*`]", "", card), maxsplit=1)[0]
    return first if len(first) <= 140 else first[:140] + "…"


def card_markdown(name: str, suite: Suite | None = None) -> str:
    """A method's whole card: what it does (`card_text`) and what the suite measured."""
    cls = registry()[name]
    return f"{card_text(name) or '### ' + (cls.label or name)}\n\n{measured_section(name, suite)}"


def figures(suite: Suite | None = None) -> list[Path]:
    """The suite's plots that exist (a section not run has none)."""
    suite = suite or load_suite()
    return [suite.path(f) for f in FIGURES if suite.path(f).is_file()] if suite else []


__all__ = ["card_markdown", "card_text", "figures", "one_liner", "ONE_LINERS", "headline", "headline_table", "load_suite", "measured_section",
           "scaling_figure", "Suite", "where_each_method_wins", "win_sentences"]
