"""Knobs declared once. Each method's `Params` field (and each checked setting) carries its help, bounds and
choices in its dataclass metadata (`knob(...)`); the one check below reads them for every entry point: the CLI's
`--set`, the UI's knob widgets and Settings tab, bench specs such as `btr@bits=3`, and the Python API (a `Params`
or `Settings` is checked when it is made). The widgets and the knob tables read the same declarations, so a
bound is written in one place."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UserError

SPEC, DEFAULT = "ragdemo.knob", "ragdemo.default"  # metadata keys: the declaration, a setting's built-in default
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Spec:
    """What a knob accepts and how it is shown. `kind` is the type of the default (int, float, bool, str)."""

    kind: type
    help: str = ""
    label: str = ""  # a few words for widgets and tables; the field name otherwise
    min: float | None = None
    max: float | None = None
    above: float | None = None  # a strict lower bound: a share that must be more than 0
    choices: tuple = ()
    optional: bool = False  # None is a value (a setting whose default is None: no quantisation)
    env: str = ""  # for settings: the environment variable that sets it

    def allowed(self) -> str:
        """The accepted values in words: "a whole number from 1 to 50", "one of 1, 2, 4, 8, 16"."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "on or off: 1/0, true/false, yes/no"
        if self.kind is str:
            return "text"
        noun = "a whole number" if self.kind is int else "a number"
        low = f"above {self.above:g}" if self.above is not None else None
        if self.min is not None and self.max is not None:
            return f"{noun} from {self.min:g} to {self.max:g}"
        if low and self.max is not None:
            return f"{noun} {low} and at most {self.max:g}"
        if self.min is not None:
            return f"{noun} of at least {self.min:g}"
        if low:
            return f"{noun} {low}"
        return f"{noun} of at most {self.max:g}" if self.max is not None else noun


class KnobError(UserError):
    """A refused knob value: one plain sentence naming the knob, the value and what is allowed. `owner` (a method
    name, or "" for a setting) and `name` say which widget to restore."""

    def __init__(self, name: str, value: Any, allowed: str, owner: str = "", label: str = ""):
        self.name, self.value, self.allowed, self.owner, self.label = name, value, allowed, owner, label
        super().__init__(self._sentence())

    def _sentence(self) -> str:
        if self.owner:
            where = f"{self.owner}.{self.name}" + (f" ({self.label})" if self.label else "")
        else:
            where = self.label or self.name.replace("_", " ")
        return f"{where} must be {self.allowed} (got {shown(self.value)})"

    def named(self, owner: str) -> "KnobError":
        """The same refusal under the name the user typed (`rag.k` rather than `RagParams.k`)."""
        return KnobError(self.name, self.value, self.allowed, owner, self.label)


def shown(value: Any) -> str:
    """The refused value as the user typed it: 0 (from `--set rag.k=0` too), 2.5, 'keynrom', nothing."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "nothing"
    if isinstance(value, str):
        try:
            float(value)
            return value.strip()
        except ValueError:
            return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def knob(default: Any, help: str = "", *, label: str = "", min: float | None = None, max: float | None = None,
         above: float | None = None, choices: tuple | list = (), env: str = "", kind: type | None = None):
    """A dataclass field with its help, bounds and choices. With `env`, the default comes from that environment
    variable when it is set (as text: the check turns it into the knob's type, or refuses it)."""
    spec = Spec(kind or (str if default is None else type(default)), help, label, min, max, above, tuple(choices),
                default is None, env)
    if env:
        return field(default_factory=lambda: os.environ.get(env) or default, metadata={SPEC: spec, DEFAULT: default})
    return field(default=default, metadata={SPEC: spec})


def spec_of(f: dataclasses.Field) -> Spec | None:
    return f.metadata.get(SPEC)


def specs(cls_or_instance) -> dict[str, Spec]:
    """{field name: Spec} of every knob, in declaration order. A plain field (`width: int = 3`, no `knob(...)`)
    is a knob too, typed by its default with no bounds: a new method's first draft needs no declarations."""
    out = {}
    for f in fields(cls_or_instance):
        if f.name.startswith("_") or not f.init:
            continue
        out[f.name] = spec_of(f) or Spec(str if default_of(f) is None else type(default_of(f)),
                                         optional=default_of(f) is None)
    return out


def default_of(f: dataclasses.Field) -> Any:
    """A knob's built-in default (a setting's, whatever the environment says)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    spec = spec_of(f)
    if spec is not None and spec.env:
        return f.metadata[DEFAULT]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def checked(spec: Spec, name: str, value: Any) -> Any:
    """`value` as the knob's type, within its bounds and choices; KnobError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.optional:
            return None
        raise KnobError(name, value, spec.allowed(), label=spec.label)
    typed = _typed(spec, name, value)
    if spec.choices and typed not in spec.choices:
        raise KnobError(name, value, spec.allowed(), label=spec.label)
    if spec.kind in (int, float):
        too_low = (spec.min is not None and typed < spec.min) or (spec.above is not None and typed <= spec.above)
        if too_low or (spec.max is not None and typed > spec.max):
            raise KnobError(name, value, spec.allowed(), label=spec.label)
    return typed


def _typed(spec: Spec, name: str, value: Any) -> Any:
    """CLI text, UI floats (gr.Number hands back 2.0 for 2) and Python values alike; anything else is refused."""
    refuse = KnobError(name, value, spec.allowed(), label=spec.label)
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if text in TRUE | FALSE:
            return text in TRUE
        raise refuse
    if spec.kind is str:
        if isinstance(value, str):
            return value.strip()
        raise refuse
    if isinstance(value, bool):
        raise refuse
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise refuse from None
    if not math.isfinite(number):
        raise refuse
    if spec.kind is int:
        if number != int(number):
            raise refuse
        return int(number)
    return number


class Checked:
    """Dataclass mixin: every field declared with `knob()` is typed and checked when an instance is made (and by
    `dataclasses.replace`), so no path (CLI, UI, bench, Python) can build one out of bounds."""

    def __post_init__(self):
        for name, spec in specs(self).items():
            if spec.kind in (bool, int, float, str):  # other types (paths, ...) are the caller's
                try:
                    object.__setattr__(self, name, checked(spec, name, getattr(self, name)))
                except KnobError as exc:
                    raise exc.named(self.knob_owner()) from None

    @classmethod
    def knob_owner(cls) -> str:
        """How a refusal names this object's knobs: `RagParams.k`; settings return "" to be named in words."""
        return cls.__name__


def params_from(cls: type, values: dict | None, owner: str = "") -> Any:
    """Build a Params dataclass from loose values (CLI text, UI widgets, bench variants, Python). Unknown knobs
    and values outside a knob's bounds or choices are refused with one sentence naming `owner.knob`."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    owner = owner or cls.__name__
    if unknown:
        raise UserError(f"unknown knob {', '.join(map(repr, unknown))} for {owner}; its knobs are {', '.join(known)}")
    try:
        return cls(**values)
    except KnobError as exc:
        raise exc.named(owner) from None


def out_of_range(params, name: str, allowed: str, owner: str) -> KnobError:
    """A refusal for a bound only known at run time (e.g. a layer split deeper than the model), worded like the
    declared ones: `btr.split (layer split) must be a whole number from 0 to 30 for this model (got 40)`."""
    spec = specs(params).get(name)
    return KnobError(name, getattr(params, name), allowed, owner, spec.label if spec else "")


def label_of(name: str, spec: Spec, with_name: bool = True) -> str:
    """A knob's name for people: "Chunks retrieved (k)", or "Stride" when it has no label of its own."""
    words = spec.label or name.replace("_", " ")
    return words[:1].upper() + words[1:] + (f" ({name})" if spec.label and with_name else "")


def knob_table(cls: type, shared_note: dict[str, str] | None = None) -> str:
    """Markdown: every declared knob with its default, what it accepts and what it does (the Methods tab and
    `python -m ragdemo knobs` print this). `shared_note` replaces the help of knobs every method shares."""
    rows = []
    for f in fields(cls):
        spec = specs(cls).get(f.name)
        if spec is None:
            continue
        help_text = (shared_note or {}).get(f.name) or spec.help
        rows.append(f"| {label_of(f.name, spec, with_name=False)} | `{f.name}` | `{default_of(f)!r}` | {spec.allowed()} | "
                    f"{help_text.replace('|', '/')} |")
    return "| knob | name | default | allowed | what it does |\n|---|---|---|---|---|\n" + "\n".join(rows)
