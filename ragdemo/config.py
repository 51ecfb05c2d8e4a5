"""All settings in one place; each can come from an environment variable."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .params import Checked, Spec, knob, specs

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct GGUF
DEFAULT_EMBEDDER = "default"  # the embedded all-MiniLM-L6-v2
# One answer length for Ask, the CLI and the benchmark, so their numbers compare (the README's runs used 24).
DEFAULT_MAX_NEW_TOKENS = 24
MAX_NEW_TOKENS = 4096  # the most any answer may ask for (Settings, Ask knobs, CLI, bench)

HUB_PRESETS = [
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "state-spaces/mamba-130m-hf",
]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str) -> bool:
    return _env(name, "0").strip().lower() in {"1", "true", "yes", "on"}


SPACE_DATA = Path("/data")  # a Hugging Face Space's persistent storage, when the Space has it


def default_home(data: Path | None = None) -> Path:
    """RAGDEMO_HOME, else /data/ragdemo where /data exists and is writable (survives a Space restart),
    else ~/.ragdemo."""
    if os.environ.get("RAGDEMO_HOME"):
        return Path(os.environ["RAGDEMO_HOME"])
    data = SPACE_DATA if data is None else data
    if data.is_dir() and os.access(data, os.W_OK | os.X_OK):
        return data / "ragdemo"
    return Path.home() / ".ragdemo"


def default_cache(data: Path | None = None) -> Path:
    """The converted model and the CPU dtype choice: next to the store on persistent storage, so a restarted
    Space does not convert again."""
    if os.environ.get("RAGDEMO_CACHE"):
        return Path(os.environ["RAGDEMO_CACHE"])
    data = SPACE_DATA if data is None else data
    if data.is_dir() and os.access(data, os.W_OK | os.X_OK):
        return data / "ragdemo-cache"
    return Path.home() / ".cache" / "ragdemo"


@dataclass
class Settings(Checked):
    home: Path = field(default_factory=default_home)
    cache_dir: Path = field(default_factory=default_cache)
    model_id: str = field(default_factory=lambda: _env("RAGDEMO_MODEL", DEFAULT_MODEL))
    embedder_id: str = field(default_factory=lambda: _env("RAGDEMO_EMBEDDER", DEFAULT_EMBEDDER))
    device: str = field(default_factory=lambda: _env("RAGDEMO_DEVICE", "auto"))
    dtype: str = field(default_factory=lambda: _env("RAGDEMO_DTYPE", "auto"))
    attention: str = field(default_factory=lambda: _env("RAGDEMO_ATTENTION", "auto"))  # "auto" (probe) or "sdpa"
    quantize: str | None = field(default_factory=lambda: os.environ.get("RAGDEMO_QUANTIZE") or None)
    chunk_tokens: int = knob(64, "LM tokens per stored chunk", label="chunk tokens", min=8, max=512,
                             env="RAGDEMO_CHUNK_TOKENS")
    max_new_tokens: int = knob(DEFAULT_MAX_NEW_TOKENS, "answer tokens at most", label="max new tokens", min=1,
                               max=MAX_NEW_TOKENS, env="RAGDEMO_MAX_NEW_TOKENS")
    max_file_mb: float = knob(50.0, "largest upload in MB", label="max file MB", above=0, env="RAGDEMO_MAX_FILE_MB")
    max_question_chars: int = knob(2000, "longest question in characters", label="max question characters", min=1,
                                   env="RAGDEMO_MAX_QUESTION_CHARS")
    default_collection: str = "default"
    # Fairness on a shared Space (one model queue for every visitor):
    shared: bool = field(default_factory=lambda: _flag("RAGDEMO_SHARED"))  # no benchmark, no fine-tuning
    max_compare_s: float = field(default_factory=lambda: float(_env("RAGDEMO_MAX_COMPARE_S",
                                                                    "120" if _flag("RAGDEMO_SHARED") else "0")))  # 0 = no limit
    # one long job (Prepare, an upload's or the demo's preparation) stops at its first step past this; 0 = no limit
    max_job_s: float = field(default_factory=lambda: float(_env("RAGDEMO_MAX_JOB_S",
                                                                "300" if _flag("RAGDEMO_SHARED") else "0")))

    @classmethod
    def knob_owner(cls) -> str:
        return ""  # a refused setting is named in words: "max new tokens must be ..."

    def with_(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def setting_spec(name: str) -> Spec:
    """The declared bounds of one setting (widgets name them; a Settings being made checks them)."""
    return specs(Settings)[name]
