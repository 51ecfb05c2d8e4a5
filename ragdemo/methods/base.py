"""The one contract every method follows (kvpress-style): a `Method` with `Params`, returning a `Result`.

Adding a method means adding one file in this folder that defines a `Method` subclass with a `name`;
the registry finds it, and the CLI, UI and benchmark pick it up.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar

from ..engine.generate import Generation, Stream, generate
from ..engine.prompt import Prompt
from ..engine.scoring import nll_of_answer

Progress = Callable[[float, str], None]  # (fraction 0..1, message)


@dataclass
class Result:
    method: str
    answer: str = ""
    model: str = ""
    prompt_tokens: int = 0  # tokens the model conditions on
    processed_tokens: float = 0.0  # token-layers computed at query time / number of layers
    cached_tokens: int = 0
    new_tokens: int = 0
    retrieve_s: float = 0.0
    load_s: float = 0.0
    ttft_s: float = 0.0  # question received -> first answer token
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_tok_s: float = 0.0
    storage_bytes: int = 0  # bytes of cached artifacts this answer read
    bytes_per_token: float = 0.0  # of this method's cache
    sources: list[dict] = field(default_factory=list)  # {doc, chunk_id, score}
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # "what the model sees": {kind, mark, text, n_tokens}
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Params:
    """Knobs shared by every method; a method's own Params subclass adds its knobs with defaults."""

    max_new_tokens: int = 48


def params_from(cls: type, values: dict | None) -> Any:
    """Build a Params dataclass from loose values (CLI strings, UI widgets), ignoring unknown keys."""
    values = values or {}
    kwargs = {}
    for f in fields(cls):
        if f.name in values and values[f.name] is not None:
            kwargs[f.name] = _coerce(values[f.name], f.type, getattr(cls, f.name, None) if f.default is dataclasses.MISSING else f.default)
    return cls(**kwargs)


def _coerce(value, annotation, default):
    kind = type(default) if default is not None else str
    if kind is bool and isinstance(value, str):
        return value.lower() in {"1", "true", "yes", "on"}
    return kind(value)


class Method:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    card: ClassVar[str] = ""  # markdown: paper, mechanism, what is exact and what approximated, measured figures
    Params: ClassVar[type] = Params
    has_prepare: ClassVar[bool] = False
    has_finetune: ClassVar[bool] = False  # offers a per-collection training step (e.g. LLoCO's LoRA)
    order: ClassVar[int] = 50  # position in lists and UI

    def prepare(self, corpus, params, progress: Progress | None = None) -> None:
        """Offline work, cached in the store and idempotent. Most methods have none."""

    def finetune(self, corpus, params, progress: Progress | None = None) -> str:
        """Train a per-collection adapter; returns a one-line summary. Only where `has_finetune`."""
        raise NotImplementedError(f"{self.name} has no fine-tuning step")

    def answer(self, question: str, corpus, params, stream: Stream | None = None) -> Result:
        raise NotImplementedError

    def nll(self, question: str, gold: str, corpus, params) -> float:
        """Teacher-forced NLL of `gold` with exactly the context this method would condition on."""
        raise NotImplementedError

    def storage(self, corpus, params) -> int:
        """Bytes of this method's cached artifacts for the collection."""
        return 0


class PromptMethod(Method):
    """A method that only decides which text the model reads: it builds a `Prompt`, then decodes normally."""

    def build(self, question: str, corpus, params) -> tuple[Prompt, Result]:
        raise NotImplementedError

    def answer(self, question: str, corpus, params, stream: Stream | None = None) -> Result:
        t0 = time.perf_counter()
        lm = corpus.lm
        prompt, result = self.build(question, corpus, params)
        generation = generate(lm, prompt.ids, params.max_new_tokens, t0, stream)
        return finish(result, lm, prompt, generation, t0, processed=len(prompt))

    def nll(self, question: str, gold: str, corpus, params) -> float:
        prompt, _ = self.build(question, corpus, params)
        return nll_of_answer(corpus.lm, prompt.ids, gold)


def finish(result: Result, lm, prompt: Prompt, generation: Generation, t0: float, processed: float) -> Result:
    """Fill the fields every method reports the same way."""
    result.answer = generation.text
    result.model = lm.model_id
    result.prompt_tokens = len(prompt)
    result.processed_tokens = round(float(processed), 2)
    result.new_tokens = len(generation.ids)
    result.ttft_s = generation.ttft_s
    result.decode_s = generation.decode_s
    result.total_s = time.perf_counter() - t0
    result.decode_tok_s = (len(generation.ids) - 1) / generation.decode_s if generation.decode_s > 0 and len(generation.ids) > 1 else 0.0
    result.segments = prompt.view(lm.tokenizer)
    result.sources = [s.source for s in prompt.segments if s.source and s.mark != "repeated"]
    return result
