"""HTML and charts for the app, as pure functions of `Result` records (testable without a browser).

Every piece of user or model text goes through `esc`: uploaded documents and model output must never render as HTML.
Styles are inline so the fragments look the same in any Gradio theme and in tests.

One module per panel: shared.py (escaping, colours, one-liners), cards.py (each method's card), sees.py ("what the
model sees"), sources.py (the passages read), chart.py (the comparison figure), tables.py (History, documents).
Every public name is importable from `ragdemo.ui.render` itself.
"""
from .cards import (BADGE, CARD_STYLE, CARDS_STYLE, METRICS, Card, adapter_used, busy_warning, gold_verdict, render_card,
                    render_cards)
from .chart import comparison_figure
from .sees import (EVENT_KINDS, EVENT_WORDS, MAX_TOKENS_SHOWN, kept_share, render_legend, render_model_sees,
                   segment_share)
from ...cards import ONE_LINERS, one_liner
from .shared import MARKS, METHOD_PALETTE, MUTED, esc, fmt_num, mark_colour, mark_meaning, method_colour, short, stable_pick
from .sources import (ANSWER_WEIGHT, GOLD_BONUS, SIMILARITY_HELP, STOPWORDS, highlight_match, render_sources,
                      sentence_spans, source_chunk_ids, source_text, terms)
from .tables import HISTORY_HEADERS, HISTORY_WIDTHS, SHARED_ROW, document_table, history_rows

__all__ = ["BADGE", "CARD_STYLE", "CARDS_STYLE", "METRICS", "Card", "adapter_used", "busy_warning", "gold_verdict",
           "render_card", "render_cards", "comparison_figure", "EVENT_KINDS", "EVENT_WORDS", "MAX_TOKENS_SHOWN",
           "kept_share", "render_legend", "render_model_sees", "segment_share", "MARKS", "METHOD_PALETTE", "MUTED",
           "ONE_LINERS", "esc", "fmt_num", "mark_colour", "mark_meaning", "method_colour", "one_liner", "short",
           "stable_pick", "ANSWER_WEIGHT", "GOLD_BONUS", "SIMILARITY_HELP", "STOPWORDS", "highlight_match",
           "render_sources", "sentence_spans", "source_chunk_ids", "source_text", "terms", "HISTORY_HEADERS",
           "HISTORY_WIDTHS", "SHARED_ROW", "document_table", "history_rows"]
