"""Knob widgets generated from each method's `Params` dataclass, so a new method's knobs need no UI code.

Each field's label and one-line help come from the `# comment` after it in the method's source (read once with
`inspect`); a string field whose comment lists its values (`a | b`, `a: ...; b: ...`, `a = ...; b = ...`)
becomes a dropdown. Numbers get bounds, so invalid values are refused before anything runs."""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, fields
from functools import lru_cache

import gradio as gr

from ..errors import UserError
from ..methods import registry
from ..methods.base import Params

SHARED = {f.name for f in fields(Params)}  # knobs every method has; 0 or blank means "use the Settings tab value"

# Bounds by knob meaning, shared by every method that uses the name (unknown names get a plain number box).
# (minimum, maximum, step); a slider needs both ends.
BOUNDS: dict[str, tuple[float, float, float]] = {
    "k": (1, 50, 1), "c": (1, 64, 1), "stride": (1, 512, 1), "chunk_tokens": (8, 512, 8), "split": (0, 64, 1),
    "merge_layer": (-1, 64, 1), "selection_layer": (0, 64, 1), "r": (0, 1, 0.05), "r_o": (0, 1, 0.05),
    "r_p": (0, 1, 0.05), "lora_steps": (0, 2000, 10), "lora_r": (1, 64, 1), "max_context_tokens": (0, 32768, 64),
}
INT_CHOICES = {"bits": [1, 2, 4, 8, 16]}  # values the method accepts, where only a few are valid
WORDS = {"r o": "offline merge share", "r p": "runtime merge share", "k": "chunks retrieved (k)",
         "c": "compression ratio (c)", "r": "recomputed share (r)", "lora r": "LoRA rank", "bits": "bits per value"}


@dataclass
class Knob:
    method: str
    name: str
    default: object
    component: gr.components.Component | None = None
    choices: list | None = None


def knob_defaults(params_cls: type) -> list[tuple[str, object]]:
    """(name, default) per field; the default's type decides the widget (annotations may be strings)."""
    out = []
    for f in fields(params_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append((f.name, default))
    return out


@lru_cache(maxsize=None)
def field_comments(params_cls: type) -> dict[str, str]:
    """{field: the `# comment` after it} over the class and its dataclass bases (the docs live in the source)."""
    comments: dict[str, str] = {}
    for cls in reversed(params_cls.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", source, re.M):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def knob_help(params_cls: type, name: str) -> str:
    if name in SHARED:
        return "0 = the Settings tab value"
    return field_comments(params_cls).get(name, "")


def knob_label(name: str) -> str:
    words = WORDS.get(name.replace("_", " "), name.replace("_", " "))
    return words[:1].upper() + words[1:]


def comment_choices(comment: str, default: str) -> list[str] | None:
    """Values listed in a comment: "reconstruct (KVzip-style) | keynorm" or "rag = top-k; full = all". Only
    trusted when the default is among them."""
    parts = [p for p in re.split(r"[;|]", comment) if p.strip()]
    if len(parts) < 2:
        return None
    values = [m.group(1) for m in (re.match(r"\s*([\w.-]+)", p) for p in parts) if m]
    return values if default in values and len(set(values)) == len(values) else None


def knob_widget(params_cls: type, name: str, default: object) -> tuple[gr.components.Component, list | None]:
    label, help_text = knob_label(name), knob_help(params_cls, name)
    common = {"label": label, "info": help_text or None, "min_width": 220, "scale": 1}
    if name in SHARED:
        return gr.Number(value=0, precision=0, minimum=0, maximum=4096, **common), None
    if isinstance(default, bool):
        with gr.Column(min_width=220, scale=1):  # a bare checkbox ignores min_width and gets squeezed in a row
            return gr.Checkbox(value=default, label=label, info=help_text or None), None
    if isinstance(default, int) and name in INT_CHOICES:
        return gr.Dropdown(INT_CHOICES[name], value=default, **common), INT_CHOICES[name]
    if isinstance(default, (int, float)) and name in BOUNDS:
        low, high, step = BOUNDS[name]
        return gr.Slider(low, high, value=default, step=step, **common), None
    if isinstance(default, int):
        return gr.Number(value=default, precision=0, **common), None
    if isinstance(default, float):
        return gr.Number(value=default, **common), None
    choices = comment_choices(help_text, str(default)) if isinstance(default, str) else None
    if choices:
        return gr.Dropdown(choices, value=default, **common), choices
    return gr.Textbox(value="" if default is None else str(default), **common), None


class KnobSet:
    """All methods' knob widgets; `values(*widget_values)` turns what the user set into Workbench knobs."""

    def __init__(self):
        self.knobs: list[Knob] = []

    def build(self) -> None:
        """Render one closed accordion per method with knobs (call inside a Blocks layout)."""
        for name, cls in registry().items():
            defaults = knob_defaults(cls.Params)
            with gr.Accordion(f"{cls.label or name} knobs", open=False), gr.Row():
                for knob_name, default in defaults:
                    widget, choices = knob_widget(cls.Params, knob_name, default)
                    self.knobs.append(Knob(name, knob_name, default, widget, choices))

    @property
    def components(self) -> list[gr.components.Component]:
        return [k.component for k in self.knobs]

    def values(self, *widget_values) -> dict[str, dict]:
        """{method: {knob: value}}; blank widgets (and 0 for shared knobs) are left out, so the method's or the
        Settings' default applies. A value out of bounds or not among the choices raises UserError."""
        out: dict[str, dict] = {}
        for knob, value in zip(self.knobs, widget_values):
            if value is None or (isinstance(value, str) and not value.strip() and not isinstance(knob.default, str)):
                continue
            if knob.name in SHARED and isinstance(value, (int, float)) and value <= 0:
                continue
            if isinstance(value, float) and isinstance(knob.default, int) and not isinstance(knob.default, bool):
                if value != int(value):
                    raise UserError(f"{knob.method}.{knob.name}: a whole number, got {value:g}")
                value = int(value)
            check(knob, value)
            out.setdefault(knob.method, {})[knob.name] = value
        return out


def check(knob: Knob, value) -> None:
    label = f"{knob.method}.{knob.name} ({knob_label(knob.name)})"
    if knob.choices is not None and value not in knob.choices:
        raise UserError(f"{label}: choose one of {', '.join(map(str, knob.choices))}, got {value!r}")
    if knob.name in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high, _ = BOUNDS[knob.name]
        if not low <= value <= high:
            raise UserError(f"{label}: between {low:g} and {high:g}, got {value:g}")
