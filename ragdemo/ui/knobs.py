"""Knob widgets generated from each method's `Params` declarations (ragdemo/params.py), so a new method's knobs
need no UI code: a bool is a checkbox, a knob with choices a dropdown, a number a number box whose help names
its range.

The number boxes carry no Gradio bounds on purpose: Gradio refuses an out-of-range number before the handler
runs, with a red "Error" over the control. The one check in ragdemo/params.py refuses it instead, as a sentence
next to the button that was pressed, and the box goes back to the value in force."""
from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from ..errors import UserError
from ..methods import registry
from ..methods.base import Params
from ..params import KnobError, Spec, checked, default_of, label_of, specs

SHARED = {f.name for f in fields(Params)}  # knobs every method has; 0 or blank means "use the Settings tab value"
SETTINGS_VALUE = 0  # what a shared knob's box shows when the Settings value applies


@dataclass
class Knob:
    method: str
    name: str
    default: object
    spec: Spec
    component: gr.components.Component | None = None

    @property
    def in_force(self):
        """What the box shows when nothing was changed: the method's default (0 = the Settings value)."""
        return SETTINGS_VALUE if self.name in SHARED else self.default

    @property
    def choices(self) -> list | None:
        return list(self.spec.choices) or None


def knob_defaults(params_cls: type) -> list[tuple[str, object]]:
    """(name, default) per declared knob."""
    return [(f.name, default_of(f)) for f in fields(params_cls) if f.name in specs(params_cls)]


def knob_help(name: str, spec: Spec) -> str:
    if name in SHARED:
        return f"0 = the Settings tab value; otherwise {spec.allowed()}"
    if spec.choices or spec.kind in (bool, str):
        return spec.help
    return f"{spec.help} · {spec.allowed()}" if spec.help else spec.allowed()


def knob_widget(method: str, name: str, spec: Spec, default: object) -> gr.components.Component:
    label, help_text = label_of(name, spec), knob_help(name, spec)
    common = {"label": label, "info": help_text or None, "min_width": 220, "scale": 1,
              "elem_id": f"knob-{method}-{name}"}
    if name in SHARED:
        return gr.Number(value=SETTINGS_VALUE, precision=0, **common)
    if spec.kind is bool:
        with gr.Column(min_width=220, scale=1):  # a bare checkbox ignores min_width and gets squeezed in a row
            return gr.Checkbox(value=default, label=label, info=help_text or None, elem_id=common["elem_id"])
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=default, **common)
    if spec.kind is int:
        return gr.Number(value=default, precision=0, **common)
    if spec.kind is float:
        small = spec.max is not None and spec.max <= 1
        return gr.Number(value=default, step=0.05 if small else 1, **common)
    return gr.Textbox(value="" if default is None else str(default), **common)


class KnobSet:
    """All methods' knob widgets; `values(*widget_values)` turns what the user set into Workbench knobs."""

    def __init__(self):
        self.knobs: list[Knob] = []

    def build(self) -> None:
        """Render one closed accordion per method with knobs (call inside a Blocks layout)."""
        for name, cls in registry().items():
            with gr.Accordion(f"{cls.label or name} knobs", open=False, elem_id=f"knobs-{name}"), gr.Row():
                for knob_name, spec in specs(cls.Params).items():
                    default = dict(knob_defaults(cls.Params))[knob_name]
                    widget = knob_widget(name, knob_name, spec, default)
                    self.knobs.append(Knob(name, knob_name, default, spec, widget))

    @property
    def components(self) -> list[gr.components.Component]:
        return [k.component for k in self.knobs]

    def values(self, *widget_values) -> dict[str, dict]:
        """{method: {knob: value}}; blank boxes (and 0 for shared knobs) are left out, so the method's or the
        Settings' default applies. A refused value raises KnobError naming `method.knob`."""
        out: dict[str, dict] = {}
        for knob, value in zip(self.knobs, widget_values):
            if value is None or (isinstance(value, str) and not value.strip() and knob.spec.kind is not str):
                continue
            if knob.name in SHARED and value == SETTINGS_VALUE:
                continue
            try:
                value = checked(knob.spec, knob.name, value)
            except KnobError as exc:
                raise exc.named(knob.method) from None
            out.setdefault(knob.method, {})[knob.name] = value
        return out

    def restored(self, error: UserError) -> list:
        """One update per widget after a refusal: the refused knob goes back to the value in force, the others
        stay as they are (a refusal that names no single knob changes none)."""
        refused = (getattr(error, "owner", None), getattr(error, "name", None))
        return [gr.update(value=k.in_force) if (k.method, k.name) == refused else gr.skip() for k in self.knobs]

    def unchanged(self) -> list:
        return [gr.skip()] * len(self.knobs)
