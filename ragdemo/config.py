"""All settings in one place; each can come from an environment variable."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct GGUF
DEFAULT_EMBEDDER = "default"  # the embedded all-MiniLM-L6-v2

HUB_PRESETS = [
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "state-spaces/mamba-130m-hf",
]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass
class Settings:
    home: Path = field(default_factory=lambda: Path(_env("RAGDEMO_HOME", str(Path.home() / ".ragdemo"))))
    cache_dir: Path = field(default_factory=lambda: Path(_env("RAGDEMO_CACHE", str(Path.home() / ".cache" / "ragdemo"))))
    model_id: str = field(default_factory=lambda: _env("RAGDEMO_MODEL", DEFAULT_MODEL))
    embedder_id: str = field(default_factory=lambda: _env("RAGDEMO_EMBEDDER", DEFAULT_EMBEDDER))
    device: str = field(default_factory=lambda: _env("RAGDEMO_DEVICE", "auto"))
    dtype: str = field(default_factory=lambda: _env("RAGDEMO_DTYPE", "auto"))
    quantize: str | None = field(default_factory=lambda: os.environ.get("RAGDEMO_QUANTIZE") or None)
    chunk_tokens: int = field(default_factory=lambda: int(_env("RAGDEMO_CHUNK_TOKENS", "64")))
    max_new_tokens: int = field(default_factory=lambda: int(_env("RAGDEMO_MAX_NEW_TOKENS", "48")))
    max_file_mb: float = field(default_factory=lambda: float(_env("RAGDEMO_MAX_FILE_MB", "50")))
    max_question_chars: int = field(default_factory=lambda: int(_env("RAGDEMO_MAX_QUESTION_CHARS", "2000")))
    default_collection: str = "default"

    def with_(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
