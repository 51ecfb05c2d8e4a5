"""Shared fixtures. The real default model is converted once and kept in ~/.cache/ragdemo/models between runs;
fast tests use a tiny randomly initialised Llama with the default tokenizer."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ragdemo.config import Settings, default_cache  # noqa: E402
from ragdemo.models.lm import converted_default_dir  # noqa: E402


def _test_cache() -> None:
    """The tests (and the apps and CLIs they start) share the user's converted models, which take minutes to
    convert, but not the remembered CPU dtype choice: a probe timed under a test run's load must not decide which
    dtype the user's app runs in. So RAGDEMO_CACHE points at a fresh folder whose models/ is the user's."""
    if os.environ.get("RAGDEMO_CACHE"):
        return
    models = default_cache() / "models"
    models.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="ragdemo-test-cache-"))
    (cache / "models").symlink_to(models, target_is_directory=True)
    os.environ["RAGDEMO_CACHE"] = str(cache)


_test_cache()


@pytest.fixture(scope="session")
def default_model_dir():
    return converted_default_dir(Settings().cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A 2-layer random Llama (same config family as SmolLM2, grouped-query attention) with the real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_settings(home, model_id, **extra) -> Settings:
    return Settings(home=home, model_id=str(model_id), dtype="fp32", device="cpu", **extra)


@pytest.fixture
def tiny_settings(tmp_path, tiny_model_dir):
    return make_settings(tmp_path / "home", tiny_model_dir, max_new_tokens=8)


@pytest.fixture
def tiny_bench(tiny_settings):
    from ragdemo.workbench import Workbench

    return Workbench(tiny_settings)


@pytest.fixture
def default_settings(tmp_path):
    return Settings(home=tmp_path / "home", device="cpu", max_new_tokens=24)


@pytest.fixture
def tiny_lm(tiny_settings):
    from ragdemo.models import load_lm

    return load_lm(tiny_settings)


EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889 as the "
          "entrance to the World's Fair. Gustave Eiffel's company designed and built the tower. ")
FILLER = ("Bananas are yellow fruits that grow in tropical regions. They are rich in potassium and are eaten "
          "all over the world. Many people eat them for breakfast. ")


@pytest.fixture
def docs_dir(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "eiffel.txt").write_text(EIFFEL * 3)
    (folder / "bananas.md").write_text("# Bananas\n\n" + FILLER * 4)
    return folder
