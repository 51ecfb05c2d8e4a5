"""Which methods a benchmark compares: `rag,btr@bits=1` parsed into `MethodSpec`s, their knobs checked, the
per-method question limits, and the baselines (closed book, the reference) every run carries."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..methods import get_method
from ..methods.base import check_on_model, params_from

REFERENCES = ("rag", "full_context")


@dataclass
class MethodSpec:
    """One column of the comparison: a registered method with knobs. `btr@bits=1` is labelled "btr@bits=1"."""
    label: str
    name: str
    knobs: dict = field(default_factory=dict)
    limit: int | None = None  # ask only the first `limit` questions (for very slow methods); None = all
    answers: bool = True  # False: NLL only (closed book / reference added for context value kept)

    def method(self):
        return get_method(self.name)

    def params(self, max_new_tokens: int):
        return params_from(self.method().Params, {"max_new_tokens": max_new_tokens, **self.knobs})


def parse_method_specs(text: str | list[str] | None, knobs: dict[str, dict] | None = None,
                       default: tuple[str, ...] = ("closed_book", "full_context", "rag")) -> list[MethodSpec]:
    """`rag,btr@bits=1,btr@bits=8@k=6` -> specs; `--set btr.k=6` knobs apply to every variant of btr
    (a variant's own knobs win)."""
    items = text.split(",") if isinstance(text, str) else (text or list(default))
    specs, labels = [], set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, *pairs = item.split("@")
        method = get_method(name.strip())
        variant = {}
        for pair in pairs:
            knob, sep, value = pair.partition("=")
            if not sep or not knob.strip():
                raise UserError(f"method variant {item!r}: use METHOD@KNOB=VALUE[@KNOB=VALUE]")
            variant[knob.strip()] = value.strip()
        merged = {**(knobs or {}).get(method.name, {}), **variant}
        _check_knobs(method, merged, item)
        if item in labels:
            raise UserError(f"method {item!r} is listed twice")
        labels.add(item)
        specs.append(MethodSpec(item, method.name, merged))
    if not specs:
        raise UserError("no methods given")
    return specs


def _check_knobs(method, knobs: dict, label: str) -> None:
    """The knobs' declared bounds and choices, as everywhere else; the message starts with the variant's label."""
    try:
        params_from(method.Params, knobs, method.name)
    except UserError as exc:
        raise UserError(f"{label}: {exc}") from None


def check_specs_on_model(specs: list[MethodSpec], lm, max_new_tokens: int) -> None:
    """The rules that need the model (e.g. a layer split deeper than its layers), before the first question."""
    for spec in specs:
        try:
            check_on_model(spec.method(), spec.params(max_new_tokens), lm)
        except UserError as exc:
            raise UserError(f"{spec.label}: {exc}") from None


def apply_limits(specs: list[MethodSpec], limits: dict[str, int] | None) -> None:
    for label, limit in (limits or {}).items():
        matched = [s for s in specs if s.label == label or s.name == label]
        if not matched:
            raise UserError(f"--limit {label}: no such method in --methods")
        for spec in matched:
            spec.limit = int(limit)


def with_baselines(specs: list[MethodSpec], reference: str, knobs: dict | None) -> tuple[list[MethodSpec], str]:
    """Make sure closed book (NLL at least) and the reference (answered, for TTFT ratios) are in the run."""
    if reference not in REFERENCES and reference not in [s.label for s in specs]:
        raise UserError(f"--reference must be one of {', '.join(REFERENCES)} or a label in --methods")
    specs = list(specs)
    if not any(s.label == reference for s in specs):
        ref_name = reference.split("@")[0]
        specs.append(MethodSpec(reference, ref_name, dict((knobs or {}).get(ref_name, {}))))
    if not any(s.label == "closed_book" for s in specs):
        specs.insert(0, MethodSpec("closed_book", "closed_book", answers=False))
    return specs, reference
