"""One meaning per figure, for every method and every screen. The `Result` docstring, the UI's tooltips, the
benchmark tables' notes and the README's glossary are all generated from these two tables."""
from __future__ import annotations

# The numbers of one answer (`Result` fields).
FIELDS: dict[str, str] = {
    "prompt_tokens": "what the model attends to when it produces the first answer token, in token-layers divided "
                     "by the number of layers: a token present in every layer counts 1, one kept in only some "
                     "layers or KV heads (compressed, merged away) counts that share. Always processed + cached",
    "processed_tokens": "token-layers of the prompt computed at query time, up to the first answer token, divided "
                        "by the number of layers. Never more than prompt tokens. Work after the first answer token "
                        "(RETRO's re-retrievals and re-prefills) is listed in the answer's events, not here",
    "cached_tokens": "token-layers of the prompt read from storage or a cache instead of computed now (stored "
                     "passage artifacts, the shared instruction prefix), divided by the number of layers; "
                     "processed + cached = prompt for every method",
    "overhead_tokens": "token-layers computed at query time before the first answer token for text the model then "
                       "does not attend to, divided by the number of layers: lingua's question-aware scoring pass, "
                       "CacheBlend's key/value projections of the tokens it then recomputes whole. Part of TTFT, "
                       "not of the prompt",
    "new_tokens": "answer tokens generated",
    "retrieve_s": "seconds to embed the question, search the index and fetch the chunks, before the first answer "
                  "token (RETRO's later re-retrievals are in its events)",
    "load_s": "seconds to read and decode stored artifacts (and switch adapters) for this answer",
    "prepare_s": "seconds spent building missing offline artifacts during this answer (first use of new knobs "
                 "or new chunks); never part of TTFT",
    "ttft_s": "seconds from the question to the first answer token, preparation excluded",
    "decode_s": "seconds from the first to the last answer token",
    "total_s": "seconds for the whole answer, preparation excluded",
    "decode_tok_s": "answer tokens per second after the first",
    "storage_bytes": "bytes of stored artifacts this answer read (per-chunk blobs plus the shared parts it used)",
    "bytes_per_token": "everything the method stores for the collection (per-chunk artifacts and shared parts: "
                       "decoder, codebook, adapter) divided by the collection's tokens",
    "chunk_bytes_per_token": "per-chunk artifact bytes this answer read divided by the passage tokens they cover "
                             "(shared parts excluded)",
}

# The benchmark's quality and speed measures (columns of every results table).
MEASURES: dict[str, str] = {
    "value kept": "context value kept: Σ(NLL closed book − NLL method) / Σ(NLL closed book − NLL reference) of "
                  "the gold answer, teacher-forced, over the same questions; 0% = no better than closed book, "
                  "100% = as good as the reference (RAG unless named)",
    "contains vs ref": "answer quality relative to the reference: the share of questions whose answer contains a "
                       "gold answer, divided by the reference's share on the same questions",
    "F1 vs ref": "mean SQuAD F1 of the answers divided by the reference's on the same questions",
    "interval": "[low, high] is a 95% paired bootstrap interval: questions are resampled with replacement, "
                "method and reference together, 2,000 times",
    "disagree": "value kept and answer quality tell different stories: their intervals do not overlap",
    "TTFT vs ref": "the reference's mean time to first token over this method's, on the questions both "
                   "answered, said as 'x faster' or 'x slower' than the reference",
}


def table_markdown(entries: dict[str, str], head: str) -> str:
    rows = [f"| `{name}` | {text} |" for name, text in entries.items()]
    return "\n".join([f"| {head} | meaning (the same for every method) |", "|---|---|", *rows])


def glossary_markdown() -> str:
    """The README's glossary: every answer field, then every benchmark measure."""
    return table_markdown(FIELDS, "field") + "\n\n" + table_markdown(MEASURES, "measure")
