"""The results suite's scaling section (bench-scaling) as screens show it: "where each method wins", with its plot,
its table and one sentence per method read from the data."""
from __future__ import annotations

from pathlib import Path

from ..bench.scaling import scaling_markdown, win_sentence
from .measured import NOT_RUN
from .suite import Suite, load_suite

SECTION = "scaling"
FIGURE = "scaling/scaling.png"


def scaling_figure(suite: Suite | None = None) -> Path | None:
    """The log-log plot of TTFT against prompt tokens, when the suite has the section."""
    suite = suite or load_suite()
    if suite is None or not suite.path(FIGURE).is_file():
        return None
    return suite.path(FIGURE)


def win_sentences(suite: Suite | None = None) -> list[str]:
    """One sentence per method of the run (RAG, the reference, has none), from the suite's scaling record."""
    suite = suite or load_suite()
    record = suite.data(SECTION) if suite else None
    if not record:
        return []
    return [win_sentence(record, label) for label in record["methods"] if label != record["reference"]]


def where_each_method_wins(suite: Suite | None = None) -> str:
    """The sentences, the table and the ceilings' definitions, stamped with the run they come from."""
    suite = suite or load_suite()
    if suite is None:
        return f"**Where each method wins:** {NOT_RUN}."
    record = suite.data(SECTION)
    if not record:
        return f"**Where each method wins:** not in this suite ({suite.relative()}): `python -m ragdemo results` runs it."
    ladders = {rung["ladder"]: rung["description"] for rung in record["rungs"]}
    parts = [f"TTFT as the context grows, each method at its defaults against RAG reading the same chunks (one run "
             f"of the results suite: {suite.where()}). Ladders: "
             + "; ".join(f"**{name}**, {text}" for name, text in ladders.items()) + ".", ""]
    parts += [f"- {line}" for line in win_sentences(suite)]
    parts += ["", scaling_markdown(record), "",
              "**Ceiling**: the TTFT a method would have if only the work it cannot avoid counted, from the same "
              "size's parts of this run; **share** = ceiling TTFT / the method's TTFT."]
    parts += [f"- `{name}`: {rule}" for name, rule in record["ceilings"].items()]
    return "\n".join(parts)
