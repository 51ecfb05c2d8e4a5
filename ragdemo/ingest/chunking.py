"""Chunking by LM tokens (RETRO's 64 by default), keeping token and character spans."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Chunk:
    ord: int
    text: str
    tok_start: int
    tok_end: int
    char_start: int
    char_end: int


def chunk_text(text: str, tokenizer, size: int = 64) -> list[Chunk]:
    """Consecutive chunks of `size` tokens. Character spans tile the text (each chunk runs to the next one's
    start), so joining the chunks of a document gives the document back."""
    if size < 1:
        raise ValueError("chunk size must be at least 1 token")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    chunks = []
    for ord_, start in enumerate(range(0, len(offsets), size)):
        end = min(start + size, len(offsets))
        char_start = 0 if start == 0 else offsets[start][0]
        char_end = offsets[end][0] if end < len(offsets) else len(text)
        chunks.append(Chunk(ord_, text[char_start:char_end], start, end, char_start, char_end))
    return chunks
