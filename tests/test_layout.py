"""One passage layout: RAG reads token for token the sequence the reuse methods approximate, so each of them at
its exact setting gives RAG's logits (here: the same teacher-forced NLL of a several-token answer, which is the
log-softmax of those logits at every answer position)."""
from __future__ import annotations

import pytest

from ragdemo.methods import get_method
from ragdemo.methods.base import params_from

QUESTION = "When was the Eiffel Tower completed?"
GOLD = "It was completed in 1889 for the World's Fair."


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, default_model_dir):
    """The tiny test Llama with weights ten times larger than its default init: its predictions then depend
    strongly on the context (the default init gives near-uniform logits, where any two prompts score alike)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.2)
    path = tmp_path_factory.mktemp("sharp-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sharp_model_dir):
    from tests.conftest import EIFFEL, FILLER, make_settings
    from ragdemo.workbench import Workbench

    bench = Workbench(make_settings(tmp_path_factory.mktemp("layout") / "home", sharp_model_dir))
    bench.ingest([("eiffel.txt", (EIFFEL * 3).encode()), ("bananas.md", ("# Bananas\n\n" + FILLER * 4).encode())],
                 prepare=False)
    return bench.corpus()


def nll(corpus, name: str, knobs: dict) -> float:
    method = get_method(name)
    params = params_from(method.Params, knobs)
    if method.has_prepare:
        method.prepare(corpus, params)
    return method.nll(QUESTION, GOLD, corpus, params)


# (method, its exact setting, tolerance in nats per token): fp16 storage of an fp32 model's states or KV rounds
# at about 1e-3 relative; a different token sequence moves the NLL by far more (checked below).
EXACT = [
    ("cacheblend", {"r": 1.0}, 1e-4),  # every passage token recomputed: a full prefill
    ("lingua", {"ratio": 1.0}, 1e-6),  # every token kept: the same ids as text
    ("lloco", {"c": 1, "k": 1, "storage": "fp16"}, 2e-3),  # one passage right after the prefix, as when its cache was captured
    ("btr", {"split": 0, "bits": 16, "calibrate": False, "query_aware": False}, 2e-3),  # no stored layer: fp16 embeddings, all layers now
]


@pytest.mark.parametrize("name,knobs,tolerance", EXACT, ids=[e[0] for e in EXACT])
def test_each_reuse_method_at_its_exact_setting_gives_rags_logits(corpus, name, knobs, tolerance):
    rag = nll(corpus, "rag", {"k": knobs.get("k", 5)})
    assert nll(corpus, name, knobs) == pytest.approx(rag, abs=tolerance)


def test_the_check_would_see_another_layout(corpus):
    """The tolerance is far below what a different token sequence changes: the same chunks joined where they
    touch (the layout RAG read before) move the NLL by much more."""
    from ragdemo.engine.prompt import build_prompt
    from ragdemo.engine.scoring import nll_of_answer

    from ragdemo.methods.rag import join_touching

    hits, _ = corpus.retrieve_in_order(QUESTION, 5)
    joined = join_touching(hits)
    assert len(joined) < len(hits), "the fixture must retrieve touching chunks"
    assert nll(corpus, "rag", {"k": 5, "join": True}) == nll_of_answer(
        corpus.lm, build_prompt(corpus.lm.tokenizer, QUESTION, joined).ids, GOLD)  # the study's knob reads it
    other = nll_of_answer(corpus.lm, build_prompt(corpus.lm.tokenizer, QUESTION, joined).ids, GOLD)
    assert abs(other - nll(corpus, "rag", {"k": 5})) > 20 * max(t for _, _, t in EXACT)
