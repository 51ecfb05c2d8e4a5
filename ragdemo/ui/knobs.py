"""Knob widgets generated from each method's `Params` dataclass, so a new method's knobs need no UI code."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import gradio as gr

from ..methods import registry
from ..methods.base import Params

SHARED = {f.name for f in fields(Params)}  # knobs every method has; 0 or blank means "use the Settings tab value"


@dataclass
class Knob:
    method: str
    name: str
    default: object
    component: gr.components.Component | None = None


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


def knob_widget(name: str, default: object) -> gr.components.Component:
    label = name.replace("_", " ")
    if name in SHARED:
        return gr.Number(value=0, label=label, precision=0, minimum=0, min_width=200, scale=1,
                         info="0 = the Settings tab value")
    if isinstance(default, bool):
        with gr.Column(min_width=200, scale=1):  # a bare checkbox ignores min_width and gets squeezed in a row
            return gr.Checkbox(value=default, label=label)
    if isinstance(default, int):
        return gr.Number(value=default, label=label, precision=0, min_width=200, scale=1)
    if isinstance(default, float):
        return gr.Number(value=default, label=label, min_width=200, scale=1)
    return gr.Textbox(value="" if default is None else str(default), label=label, min_width=200, scale=1)


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
                    self.knobs.append(Knob(name, knob_name, default, knob_widget(knob_name, default)))

    @property
    def components(self) -> list[gr.components.Component]:
        return [k.component for k in self.knobs]

    def values(self, *widget_values) -> dict[str, dict]:
        """{method: {knob: value}}; blank widgets (and 0 for shared knobs) are left out, so the method's or the
        Settings' default applies."""
        out: dict[str, dict] = {}
        for knob, value in zip(self.knobs, widget_values):
            if value is None or (isinstance(value, str) and not value.strip() and not isinstance(knob.default, str)):
                continue
            if knob.name in SHARED and isinstance(value, (int, float)) and value <= 0:
                continue
            if isinstance(value, float) and isinstance(knob.default, int) and not isinstance(knob.default, bool):
                value = int(value)
            out.setdefault(knob.method, {})[knob.name] = value
        return out
