"""One prompt layout shared by every method, so their token counts and answers are comparable.

A prompt is a list of segments: instruction prefix, passages, question. Methods differ in how each segment
reaches the model (as text, from a cache, binarized, compressed, repeated); the segment's `mark` says which,
and the UI's "what the model sees" view is drawn from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SYSTEM = "Answer the question using the context. Reply with a short answer."
CLOSED_BOOK_SYSTEM = "Answer the question from what you know. Reply with a short answer."  # no context to point at
MARKER = "\u0000CONTENT\u0000"


@dataclass
class Segment:
    kind: str  # prefix | passage | question | suffix
    ids: list[int]
    mark: str = "text"  # text | cached | compressed | binarized | merged | repeated | retrieved | pruned
    source: dict | None = None
    # per token, the share of it the model really reads (1 kept, 0 dropped; LLoCO: the fraction of layers x KV
    # heads that kept it). None = every token is read. The UI dims dropped tokens, as the LLMLingua demo does.
    keep: list[float] | None = None
    # The segment's share of the answer's accounting, in token-layers / layers: computed at query time before the
    # first answer token, and read from storage or a cache. None = the mark's plain meaning (a "cached" segment
    # is read whole, any other is computed whole); methods that split a segment's layers set both.
    processed: float | None = None
    cached: float | None = None

    def account(self) -> tuple[float, float]:
        """(processed, cached) of this segment; their sum is what it adds to the prompt's token-layers."""
        if self.processed is not None or self.cached is not None:
            return float(self.processed or 0.0), float(self.cached or 0.0)
        return (0.0, float(len(self.ids))) if self.mark == "cached" else (float(len(self.ids)), 0.0)

    def read_from_cache(self, tokens: int) -> None:
        """The first `tokens` of this segment came from a cache (the shared prefix); the rest was computed now."""
        self.processed, self.cached = float(len(self.ids) - tokens), float(tokens)
        if tokens == len(self.ids):
            self.mark = "cached"


@dataclass
class Account:
    """One answer's token accounting at its first token, in token-layers / layers: prompt = processed + cached."""

    processed: float
    cached: float

    @property
    def prompt(self) -> float:
        return self.processed + self.cached


@dataclass
class Prompt:
    segments: list[Segment] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [i for s in self.segments for i in s.ids]

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self.segments)

    def account(self) -> Account:
        shares = [s.account() for s in self.segments]
        return Account(sum(p for p, _ in shares), sum(c for _, c in shares))

    def view(self, tokenizer) -> list[dict]:
        return [_segment_view(s, tokenizer) for s in self.segments]


def _segment_view(segment: Segment, tokenizer) -> dict:
    processed, cached = segment.account()
    view = {"kind": segment.kind, "mark": segment.mark, "n_tokens": len(segment.ids),
            "text": tokenizer.decode(segment.ids), "source": segment.source,
            "processed": round(processed, 2), "cached": round(cached, 2)}
    if segment.keep is not None:
        # token by token, so the UI can dim what was dropped
        view["tokens"] = [tokenizer.decode([i]) for i in segment.ids]
        view["keep"] = [round(float(k), 3) for k in segment.keep]
    return view


def chat_frame(tokenizer, system: str = SYSTEM) -> tuple[str, str]:
    """The text before and after the user's message, from the model's own chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": MARKER}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, tail = text.split(MARKER)
        return head, tail
    return system + "\n\n", "\nAnswer:"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def shared_prefixes(tokenizer) -> list[list[int]]:
    """The instruction prefixes every prompt starts with, whatever the question: the system turn + "Context:"
    (retrieval prompts) and the bare system turn (closed book; JRT, whose question comes next). Prefix caching
    reuses their states across answers and methods."""
    head, _ = chat_frame(tokenizer)
    closed_head, _ = chat_frame(tokenizer, CLOSED_BOOK_SYSTEM)
    return [encode(tokenizer, head + "Context:\n"), encode(tokenizer, head), encode(tokenizer, closed_head)]


def question_ids(tokenizer, question: str) -> list[int]:
    """The question segment a prompt ends with: the question, then the assistant turn that starts the answer."""
    _, tail = chat_frame(tokenizer)
    return encode(tokenizer, question_text(question, tail))


def question_text(question: str, tail: str) -> str:
    return f"Question: {question.strip()}{tail}"


def lead_question_ids(tokenizer, question: str) -> list[int]:
    """The question as a layout places it before the passages (BTR's query-aware upper layers): the same words,
    without the assistant turn, which only the final copy opens."""
    return encode(tokenizer, question_text(question, "\n\n"))


def passage_text(text: str) -> str:
    return text.strip() + "\n\n"


def passage_ids(tokenizer, text: str) -> list[int]:
    """A chunk's token sequence as every prompt and every method's offline artifact reads it: the one place its
    layout is decided (prompts, per-chunk caches, states and scores all call this)."""
    return encode(tokenizer, passage_text(text))


def build_prompt(tokenizer, question: str, passages: list[dict], repeat_context: bool = False) -> Prompt:
    """[prefix "Context:"] [passage]... [question + assistant turn]; closed-book when `passages` is empty.

    `repeat_context` gives JRT's layout: question, context, context, question.
    """
    head, tail = chat_frame(tokenizer)
    question_ids = encode(tokenizer, question_text(question, tail))
    if not passages:  # closed book: an instruction that does not mention a context it does not have
        closed_head, _ = chat_frame(tokenizer, CLOSED_BOOK_SYSTEM)
        return Prompt([Segment("prefix", encode(tokenizer, closed_head)), Segment("question", question_ids)])
    prefix = head + (question_text(question, "\n\n") if repeat_context else "") + "Context:\n"
    segments = [Segment("prefix", encode(tokenizer, prefix))]
    passage_segments = [Segment("passage", passage_ids(tokenizer, p["text"]), source=_source(p)) for p in passages]
    segments += passage_segments
    if repeat_context:
        segments += [Segment("passage", s.ids, "repeated", s.source) for s in passage_segments]
    segments.append(Segment("question", question_ids))
    return Prompt(segments)


def _source(passage: dict) -> dict:
    return {k: passage[k] for k in ("doc", "chunk_id", "score", "chunk_ids") if k in passage}
