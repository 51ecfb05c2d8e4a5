"""Settings tab: model, device, quantisation, answer length. One shared Workbench; a failed switch keeps the old model."""
from __future__ import annotations

from dataclasses import replace

import gradio as gr
import torch

from ..config import DEFAULT_MODEL, HUB_PRESETS
from ..workbench import Workbench
from .common import error, info, user_errors
from .render import esc

DEVICES = ["auto", "cpu", "cuda", "mps"]
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
    except Exception as exc:  # status display only; apply() reports load failures properly
        lines.append(f"Not loaded: {esc(exc)}")
    return "\n\n".join(lines)


@user_errors
def apply(workbench: Workbench, model_id: str, device: str, quantize: str, max_new_tokens) -> str:
    model_id = (model_id or "").strip() or DEFAULT_MODEL
    try:
        max_new = int(max_new_tokens)
    except (TypeError, ValueError):
        raise error("max new tokens must be a whole number") from None
    if not 1 <= max_new <= 4096:
        raise error("max new tokens must be between 1 and 4096")
    quant = None if quantize in (None, "", "none") else quantize
    settings = replace(workbench.settings, model_id=model_id, device=device or "auto", quantize=quant,
                       max_new_tokens=max_new)
    workbench.use_settings(settings)  # ModelUnavailable -> gr.Error; the previous model stays in use
    info(f"Using {workbench.models.lm.model_id}")
    return model_status(workbench)


def build_settings_tab(workbench: Workbench) -> gr.Markdown:
    wb, s = workbench, workbench.settings
    with gr.Tab("Settings", id="settings"):
        gr.Markdown("Settings apply to everyone using this app: there is one shared model. Loading a hub model needs "
                    "internet access; when the hub is unreachable you get a message and the current model stays.")
        model = gr.Dropdown([DEFAULT_MODEL, *HUB_PRESETS], value=s.model_id, allow_custom_value=True, label="Model",
                            info="'default' = embedded SmolLM2-135M-Instruct; or any Hugging Face id or local folder")
        device = gr.Radio(DEVICES, value=s.device if s.device in DEVICES else "auto", label="Device")
        quantize = gr.Radio(QUANTIZE, value=s.quantize or "none", label="Quantisation", info=quantize_note())
        max_new = gr.Number(s.max_new_tokens, precision=0, label="Max new tokens", minimum=1, maximum=4096)
        apply_button = gr.Button("Apply", variant="primary")
        status = gr.Markdown(elem_id="model-status")
    apply_button.click(lambda *a: apply(wb, *a), [model, device, quantize, max_new], [status],
                       concurrency_limit=1, concurrency_id="model")
    return status
