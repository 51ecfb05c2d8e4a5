"""The one contract every method follows (kvpress-style): a `Method` with `Params`, returning a `Result`.

Adding a method means adding one file in this folder that defines a `Method` subclass with a `name`;
the registry finds it, and the CLI, UI and benchmark pick it up. Its card (what screens say about it) is
ragdemo/cards/text/NAME.md: this folder holds mechanism only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar

from ..config import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from ..engine.generate import Generation, Stream, generate
from ..engine.prompt import Prompt
from ..engine.scoring import nll_of_answer
from ..glossary import FIELDS, glossary_markdown  # noqa: F401 (re-exported)
from ..params import Checked, KnobError, knob, params_from  # noqa: F401 - params_from: methods build Params

Progress = Callable[[float, str], None]  # (fraction 0..1, message)


GLOSSARY = FIELDS  # one meaning per field, for every method (ragdemo/glossary.py)


@dataclass
class Result:
    """What one method produced for one question. Each number field means exactly what `GLOSSARY` says, for
    every method; `fields_help()` returns that text."""

    method: str
    answer: str = ""
    model: str = ""
    prompt_tokens: float = 0.0
    processed_tokens: float = 0.0
    cached_tokens: float = 0.0
    overhead_tokens: float = 0.0
    new_tokens: int = 0
    retrieve_s: float = 0.0
    load_s: float = 0.0
    prepare_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_tok_s: float = 0.0
    storage_bytes: int = 0
    bytes_per_token: float = 0.0
    chunk_bytes_per_token: float = 0.0
    sources: list[dict] = field(default_factory=list)  # {doc, chunk_id, score}
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # "what the model sees": {kind, mark, text, n_tokens, keep?}
    error: str = ""
    # every run's seconds when the answer was timed more than once (the time fields above then hold the medians),
    # and the share of the machine's CPU other programs used meanwhile (None where it cannot be told)
    timings: dict = field(default_factory=dict)

    @staticmethod
    def fields_help() -> dict[str, str]:
        return dict(GLOSSARY)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# The docstring is the glossary: help(Result) shows every field's one meaning.
Result.__doc__ += "\n\nFields:\n" + "\n".join(f"    {name}: {text}" for name, text in GLOSSARY.items())


TIMED_FIELDS = ("retrieve_s", "load_s", "ttft_s", "decode_s", "total_s", "decode_tok_s")


def repeated(runs: list[Result], others_cpu: float | None = None) -> Result:
    """One method's answers to one question, as one Result: the first answer (its text, tokens and events), every
    run's times in `timings`, and the medians in the time fields, so one noisy sample is never shown as a fact."""
    first = runs[0]
    first.timings = {name: [round(getattr(r, name), 6) for r in runs] for name in TIMED_FIELDS}
    first.timings.update(repeats=len(runs), others_cpu=others_cpu)
    for name in TIMED_FIELDS:
        values = sorted(first.timings[name])
        middle = len(values) // 2
        setattr(first, name, values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2)
    return first


@dataclass
class Params(Checked):
    """Knobs shared by every method; a method's own Params subclass adds its knobs with `knob(...)`, which holds
    their help, bounds and choices (ragdemo/params.py checks them wherever a Params is made)."""

    max_new_tokens: int = knob(DEFAULT_MAX_NEW_TOKENS, "answer tokens at most", label="max new tokens", min=1,
                               max=MAX_NEW_TOKENS)


def per_token(nbytes: float, tokens: float) -> float:
    """Bytes per token as every screen and table shows it: two decimals; 0 for no tokens."""
    return round(nbytes / tokens, 2) if tokens else 0.0


@dataclass
class StorageAccount:
    """One storage account for every method: per-chunk artifacts plus named shared (collection-level) parts.

    `bytes_per_token` amortises everything over the collection's tokens; `chunk_bytes_per_token` is the
    per-chunk part alone over the same tokens (labelled as such wherever it is shown)."""

    chunk_bytes: int = 0
    shared: dict[str, int] = field(default_factory=dict)  # e.g. {"decoder": 1_330_000, "adapter": 2_970_000}
    tokens: int = 0  # the collection's tokens

    @property
    def shared_bytes(self) -> int:
        return sum(self.shared.values())

    @property
    def total(self) -> int:
        return self.chunk_bytes + self.shared_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    @property
    def chunk_bytes_per_token(self) -> float:
        return self.chunk_bytes / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {"chunk_bytes": self.chunk_bytes, "shared": dict(self.shared), "shared_bytes": self.shared_bytes,
                "total": self.total, "tokens": self.tokens, "bytes_per_token": per_token(self.total, self.tokens),
                "chunk_bytes_per_token": per_token(self.chunk_bytes, self.tokens)}


class Method:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    Params: ClassVar[type] = Params
    has_prepare: ClassVar[bool] = False
    has_finetune: ClassVar[bool] = False  # offers a per-collection training step (e.g. LLoCO's LoRA)
    order: ClassVar[int] = 50  # position in lists and UI

    def check_knobs(self, params, lm) -> None:
        """Knob rules that need the model (a layer split deeper than its layers) or tie knobs together; raises a
        UserError, a `KnobError` for one knob. Bounds and choices are declared on the Params and checked when it
        is made; the Workbench calls this for every method before any of them runs."""

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

    def storage(self, corpus, params) -> "StorageAccount":
        """Everything this method keeps for the collection at these knobs, counted the same way for every method."""
        return StorageAccount(tokens=corpus.n_tokens())


def check_on_model(method: Method, params, lm) -> None:
    """`method.check_knobs` for a request: a knob the user set that this model cannot take is refused before
    anything runs; a knob left at its default that does not fit (btr's split 18 on a 4-layer test model) is not
    the user's mistake: the method's own answer then says it cannot run here, and the other methods answer."""
    try:
        method.check_knobs(params, lm)
    except KnobError as exc:
        if getattr(params, exc.name, None) != getattr(type(params)(), exc.name, None):
            raise


class PromptMethod(Method):
    """A method that only decides which text the model reads: it builds a `Prompt`, then decodes normally."""

    def build(self, question: str, corpus, params) -> tuple[Prompt, Result]:
        raise NotImplementedError

    def answer(self, question: str, corpus, params, stream: Stream | None = None) -> Result:
        t0 = time.perf_counter()
        lm = corpus.lm
        prompt, result = self.build(question, corpus, params)
        generation = generate(lm, prompt.ids, params.max_new_tokens, t0, stream)
        count_cached_prefix(prompt, generation)
        return finish(result, lm, prompt, generation, t0)

    def nll(self, question: str, gold: str, corpus, params) -> float:
        prompt, _ = self.build(question, corpus, params)
        return nll_of_answer(corpus.lm, prompt.ids, gold)


def count_cached_prefix(prompt: Prompt, generation: Generation) -> None:
    """The shared instruction prefix `generate` read from the LM's prefix cache counts as cached, not processed."""
    if generation.cached_tokens:
        prompt.segments[0].read_from_cache(generation.cached_tokens)


def load_seconds(start: float, prepare_s: float) -> float:
    """Seconds of loading since `start`: the `prepare_s` spent meanwhile building missing artifacts is preparation,
    not loading (GLOSSARY)."""
    return time.perf_counter() - start - prepare_s


def answer_clock(t0: float, prepare_s: float) -> float:
    """Where an answer's clock (TTFT, total) starts: after the `prepare_s` it spent building missing artifacts."""
    return t0 + prepare_s


def finish(result: Result, lm, prompt: Prompt, generation: Generation, t0: float, overhead: float = 0.0,
           kept_tokens: list[int] | None = None) -> Result:
    """Fill the fields every method reports the same way. The token counts come from the prompt's segments,
    which the method marked with what it computed and what it read (so the card and "what the model sees" add up
    from one source); `overhead` is work before the first token outside the prompt (GLOSSARY); `kept_tokens`:
    per passage, how many of its tokens were kept (lingua's pruning, lloco's compressed cache), shown in its view.
    Figures that need a store query (bytes_per_token) are set by the method after this call: total_s excludes it."""
    account = prompt.account()
    result.answer = generation.text
    result.model = lm.model_id
    result.prompt_tokens = round(account.prompt, 2)
    result.processed_tokens = round(account.processed, 2)
    result.cached_tokens = round(account.cached, 2)
    result.overhead_tokens = round(float(overhead), 2)
    result.new_tokens = len(generation.ids)
    result.ttft_s = generation.ttft_s
    result.decode_s = generation.decode_s
    result.total_s = time.perf_counter() - t0
    result.decode_tok_s = (len(generation.ids) - 1) / generation.decode_s if generation.decode_s > 0 and len(generation.ids) > 1 else 0.0
    result.segments = prompt.view(lm.tokenizer)
    if kept_tokens is not None:
        for view, kept in zip([v for v in result.segments if v["kind"] == "passage"], kept_tokens):
            view["kept_tokens"] = kept
    result.sources = [s.source for s in prompt.segments if s.source and s.mark != "repeated"]
    return result
