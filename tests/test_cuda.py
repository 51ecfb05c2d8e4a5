"""The `cuda` suite: exactness of the engine paths and one end-to-end answer per method on a CUDA GPU, in fp16,
bf16 and bitsandbytes 4-bit. Skipped, with the reason, where no GPU is visible.

`RAGDEMO_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py -m cuda` runs the same tests on the CPU (4-bit is
skipped there): that is how the suite itself was checked on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from ragdemo.config import Settings
from ragdemo.engine import kv as kvc
from ragdemo.engine.layers import embed, forward_all
from ragdemo.errors import NotSupported
from ragdemo.methods import registry
from ragdemo.engine.prefix import instruction_ids
from ragdemo.methods.btr import btr_forward

from .conftest import EIFFEL, FILLER

DEVICE = os.environ.get("RAGDEMO_TEST_DEVICE", "cuda")
HAVE_DEVICE = torch.cuda.is_available() if DEVICE == "cuda" else True
NO_GPU = ("no CUDA GPU visible (torch.cuda.is_available() is False on this machine): the cuda suite runs "
          "only where a GPU is present")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_DEVICE, reason=NO_GPU)]


def _bnb_ready() -> str:
    if DEVICE != "cuda":
        return "bitsandbytes 4-bit needs a CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no 4-bit here
        return f"bitsandbytes is not importable: {exc}"
    return ""


# precision per mode: (label, Settings overrides, logits tolerance)
MODES = {
    "fp16": ({"dtype": "fp16"}, 3e-2),
    "bf16": ({"dtype": "bf16"}, 1e-1),
    "4bit": ({"dtype": "fp16", "quantize": "4bit"}, 3e-2),
}


def _settings(tmp_path, model_id, mode: str, **extra) -> Settings:
    overrides, _ = MODES[mode]
    if mode == "4bit" and _bnb_ready():
        pytest.skip(_bnb_ready())
    return Settings(home=tmp_path / "home", model_id=str(model_id), device=DEVICE, max_new_tokens=6,
                    **overrides, **extra)


@pytest.fixture(params=list(MODES))
def mode(request):
    return request.param


@pytest.fixture
def tiny_device_lm(tmp_path, tiny_model_dir, mode):
    from ragdemo.models import load_lm

    lm = load_lm(_settings(tmp_path, tiny_model_dir, mode))
    assert lm.device.type == torch.device(DEVICE).type
    assert all(p.device.type == lm.device.type for p in lm.model.parameters())
    return lm


def _ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _tensor(lm, ids):
    return torch.tensor([ids], device=lm.device)


def _parts(lm):
    passages = [_ids(lm, "The Eiffel Tower was completed in 1889.\n\n"), _ids(lm, "Bananas are yellow.\n\n")]
    return instruction_ids(lm), passages, _ids(lm, "Question: When was it completed?\nAnswer:")


# ------------------------------------------------------------------------------------------- exactness
def test_engine_forward_equals_the_model_on_the_device(tiny_device_lm, mode):
    lm, tol = tiny_device_lm, MODES[mode][1]
    ids = _tensor(lm, _ids(lm, EIFFEL))
    with torch.inference_mode():
        torch.testing.assert_close(forward_all(lm, ids).float(), lm.model(input_ids=ids).logits.float(),
                                   atol=tol, rtol=tol)


def test_btr_split_zero_float_states_equal_the_full_forward(tiny_device_lm, mode):
    lm, tol = tiny_device_lm, MODES[mode][1]
    prefix, passages, question = _parts(lm)
    states = [embed(lm, _tensor(lm, p))[0].float().cpu() for p in passages]  # as stored: on the CPU
    with torch.inference_mode():
        full = lm.model(input_ids=_tensor(lm, prefix + passages[0] + passages[1] + question)).logits
        fwd = btr_forward(lm, prefix, states, question, split=0, want=len(question))
    torch.testing.assert_close(fwd.logits.float(), full[:, -len(question):].float(), atol=tol, rtol=tol)


def test_lloco_ratio_one_equals_the_full_forward_through_storage(tiny_device_lm, mode):
    lm, tol = tiny_device_lm, MODES[mode][1]
    prefix_tokens, passages, question = _parts(lm)
    prefix = kvc.prefix_layers(lm, prefix_tokens)
    captured, _ = kvc.capture(lm, prefix, passages[0])
    stored = kvc.from_bytes(kvc.to_bytes(captured, "fp16"), lm.model.dtype, lm.device)  # device -> bytes -> device
    start = len(prefix_tokens)
    layers = kvc.placed_layers(lm, prefix, [stored], [start])
    with torch.inference_mode():
        got = forward_all(lm, _tensor(lm, question), kvc.cache_from(layers), start + len(passages[0]))
        want = lm.model(input_ids=_tensor(lm, prefix_tokens + passages[0] + question)).logits
    torch.testing.assert_close(got.float(), want[:, -len(question):].float(), atol=tol, rtol=tol)


def test_rerotated_keys_match_keys_computed_at_the_new_position(tiny_device_lm, mode):
    lm, tol = tiny_device_lm, MODES[mode][1]
    ids = _ids(lm, "Gustave Eiffel's company built the tower in Paris.")
    at_0, at_37 = kvc.cache_from([]), kvc.cache_from([])
    with torch.inference_mode():
        kvc.prefill(lm, ids, at_0, 0)
        kvc.prefill(lm, ids, at_37, 37)
    shift = torch.full((1, at_0.layers[0].keys.shape[1], len(ids)), 37)  # a CPU index tensor on purpose
    for a, b in zip(at_0.layers, at_37.layers):
        torch.testing.assert_close(kvc.rotate_keys(lm, a.keys, shift).float(), b.keys.float(), atol=tol, rtol=tol)


def test_seeded_sampling_runs_on_the_device(tiny_device_lm):
    from ragdemo.engine.generate import Sampling, generate

    ids = _ids(tiny_device_lm, "The tower")
    runs = [generate(tiny_device_lm, ids, 5, 0.0, sampling=Sampling(temperature=1.0, top_p=0.9, seed=3)).ids
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


# ------------------------------------------------------------------------------- one answer per method
@pytest.fixture
def device_bench(tmp_path, default_model_dir, mode):
    """The real default model (a real tokenizer's answers, real weights to quantise) on the device."""
    from ragdemo.workbench import Workbench

    bench = Workbench(_settings(tmp_path, "default", mode))
    import inspect

    extra = {"prepare": False} if "prepare" in inspect.signature(bench.ingest).parameters else {}
    bench.ingest([("eiffel.txt", (EIFFEL * 3).encode()), ("bananas.md", (FILLER * 4).encode())], **extra)
    return bench


QUESTION = "When was the Eiffel Tower completed?"


def test_every_method_answers_on_the_device(device_bench, mode):
    names = list(registry())
    results = device_bench.ask(QUESTION, names)
    for name, result in zip(names, results):
        if result.error:
            # only an explicit, explained refusal is acceptable (e.g. a method on 4-bit weights)
            assert mode == "4bit" and "quantis" in result.error.lower(), f"{name} on {mode}: {result.error}"
            continue
        assert result.answer and result.new_tokens > 0, f"{name} on {mode} gave no answer"
        assert result.ttft_s > 0 and result.model.startswith("SmolLM2")
    assert not results[0].error  # closed book at least always answers


@pytest.mark.parametrize("method", ["btr", "lloco"])
def test_adapters_switch_on_the_device_without_touching_the_weights(device_bench, mode, method):
    """Trains a two-step LoRA, answers with it, and checks the base weights are bit-for-bit unchanged after
    (on 4-bit weights the adapter must go through peft's LoRA layers; it can never be merged into them)."""
    knobs = {method: {"lora_steps": 2, "k": 2}}
    lm = device_bench.models.lm
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    try:
        device_bench.finetune(method, knobs=knobs)
    except NotSupported as exc:
        assert mode == "4bit" and "quantis" in str(exc).lower()
        return
    (result,) = device_bench.ask(QUESTION, [method], knobs=knobs)
    assert not result.error and result.answer
    assert any("LoRA" in n for n in result.notes), result.notes
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
