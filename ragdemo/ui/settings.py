"""Settings tab: model, device, quantisation, answer length. One shared Workbench; a failed switch keeps the old model."""
from __future__ import annotations

import logging
from dataclasses import replace

import re

import gradio as gr
import torch

from ..config import DEFAULT_MODEL, HUB_PRESETS, setting_spec
from ..errors import UserError
from ..models.lm import default_model_status
from ..workbench import SETTINGS_READ_ONLY, Workbench
from .common import info, warn
from .gpu import COMPARE_CAP_S, UNTIMED_ANSWER_S, GpuGrant, on_gpu, on_zerogpu
from .render import esc


def available_devices() -> list[str]:
    """Only devices this machine has: offering mps on Linux just leads to an error."""
    mps = getattr(torch.backends, "mps", None)
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if mps and mps.is_available() else [])


DEVICES = available_devices()


def in_ui_words(message: str) -> str:
    """Messages written for the CLI name flags ("use --device cpu"); here they name the setting."""
    return re.sub(r"--([a-z][a-z-]*)(?: (\w+))?", lambda m: f"{m.group(1).replace('-', ' ')} "
                  + (f"'{m.group(2)}'" if m.group(2) else "") + " in Settings", message).replace("  ", " ")
QUANTIZE = ["none", "4bit", "8bit"]


def quantize_note() -> str:
    if torch.cuda.is_available():
        return "4-bit and 8-bit load the model with bitsandbytes on the CUDA GPU (less memory, slightly lower quality)."
    return ("4-bit and 8-bit quantisation use bitsandbytes, which needs a CUDA GPU. This machine has none, so "
            "choosing them shows an error and the current model stays loaded. On CPU the model runs in bf16 or fp32.")


def model_status(workbench: Workbench) -> str:
    s = workbench.settings
    lines = [f"**Model:** `{esc(s.model_id)}` · device `{esc(s.device)}` · quantisation `{esc(s.quantize or 'none')}` "
             f"· max new tokens {s.max_new_tokens}"]
    try:
        lm = workbench.models.lm  # already loaded: cached by load_lm
        lines.append(f"Loaded **{esc(lm.model_id)}** on {esc(lm.device)} as {esc(str(lm.dtype).replace('torch.', ''))}, "
                     f"{lm.n_layers} layers, window {lm.window} tokens (loaded in {lm.load_s:.1f} s).")
        if lm.dtype_reason:
            lines.append(f"Number format: {esc(lm.dtype_reason)}")
        if lm.packing:
            lines.append(f"Projections: {esc(lm.packing)}")
        if lm.attention:
            lines.append(f"Attention: {esc(lm.attention)}")
    except Exception as exc:  # status display only; apply() reports load failures properly
        lines.append(f"Not loaded: {esc(exc)}")
    status = default_model_status()
    lines.append(esc(status[:1].upper() + status[1:]))
    return "\n\n".join(lines)


def current_values(workbench: Workbench) -> tuple:
    s = workbench.settings
    return s.model_id, s.device if s.device in DEVICES else "auto", s.quantize or "none", s.max_new_tokens


def apply(workbench: Workbench, model_id: str, device: str, quantize: str, max_new_tokens) -> tuple:
    """(status, model, device, quantisation, max new tokens). After a failure the widgets go back to the values
    in force, so what the page shows is what runs."""
    try:
        _apply(workbench, model_id, device, quantize, max_new_tokens)
        info(f"Using {workbench.models.lm.model_id}")
        status = model_status(workbench)
    except UserError as exc:
        message = in_ui_words(str(exc))
        warn(message)
        status = f"**Not applied:** {esc(message)}\n\n{model_status(workbench)}"
    except Exception as exc:  # noqa: BLE001 - reported in the page; the log keeps the traceback
        logging.getLogger(__name__).exception("apply failed")
        warn(f"could not apply: {type(exc).__name__}: {exc}")
        status = f"**Not applied:** {esc(type(exc).__name__)}: {esc(exc)}\n\n{model_status(workbench)}"
    return (status, *current_values(workbench))


def _apply(workbench: Workbench, model_id: str, device: str, quantize: str, max_new_tokens) -> None:
    model_id = (model_id or "").strip() or DEFAULT_MODEL
    if (device or "auto") not in DEVICES:
        raise UserError(f"this machine has no {device} device")
    quant = None if quantize in (None, "", "none") else quantize
    # the answer length's bounds are declared on Settings and checked as it is made (KnobError otherwise)
    settings = replace(workbench.settings, model_id=model_id, device=device or "auto", quantize=quant,
                       max_new_tokens=max_new_tokens)
    workbench.use_settings(settings)  # ModelUnavailable: the previous model stays in use


def build_settings_tab(workbench: Workbench, ask_header: gr.Markdown | None = None) -> gr.Markdown:
    """On a shared app the tab only shows what runs: the operator sets it with variables (Workbench.use_settings
    refuses a switch there too, whatever calls it)."""
    wb, s = workbench, workbench.settings
    editable = not s.shared and not on_zerogpu()  # on ZeroGPU a model loaded inside a GPU call dies with its worker
    with gr.Tab("Settings", id="settings"):
        gr.Markdown("Settings apply to everyone using this app: there is one shared model. Loading a hub model needs "
                    "internet access; when the hub is unreachable you get a message and the current model stays."
                    if editable else f"{SETTINGS_READ_ONLY}.", elem_id="settings-note")
        model = gr.Dropdown([DEFAULT_MODEL, *HUB_PRESETS], value=s.model_id, allow_custom_value=True, label="Model",
                            info="'default' = embedded SmolLM2-135M-Instruct; or any Hugging Face id or local folder",
                            interactive=editable)
        device = gr.Radio(DEVICES, value=s.device if s.device in DEVICES else "auto", label="Device",
                          info="only the devices this machine has", interactive=editable)
        quantize = gr.Radio(QUANTIZE, value=s.quantize or "none", label="Quantisation", info=quantize_note(),
                            interactive=editable)
        # no Gradio bounds: Gradio would refuse 0 with an Error box; Settings' own check says why, next to Apply
        max_new = gr.Number(s.max_new_tokens, precision=0, label="Max new tokens", elem_id="settings-max-new",
                            info=f"answer length for every method: {setting_spec('max_new_tokens').allowed()}",
                            interactive=editable)
        apply_button = gr.Button("Apply", variant="primary", visible=editable, elem_id="settings-apply")
        status = gr.Markdown(elem_id="model-status")
    @on_gpu(wb.content, GpuGrant(lambda *a: UNTIMED_ANSWER_S, COMPARE_CAP_S))  # loads, then warms the model
    def run_apply(*values):
        return apply(wb, *values)

    applied = apply_button.click(run_apply, [model, device, quantize, max_new],
                                 [status, model, device, quantize, max_new], concurrency_limit=1, concurrency_id="model")
    if ask_header is not None:
        from .ask import model_header  # the Ask tab names the model: it changes with it

        applied.then(lambda: model_header(wb), None, [ask_header], show_progress="hidden")
    return status
