import json

import pytest
import torch

from ragdemo.methods import get_method
from ragdemo.workbench import Workbench
from tests.conftest import make_settings
from tests.test_cli import run

QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture
def corpus(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    return tiny_bench.corpus()


def passages(prompt, mark):
    return [s for s in prompt.segments if s.kind == "passage" and s.mark == mark]


def test_jrt_prompt_holds_the_context_twice_between_two_questions(corpus):
    jrt, rag = get_method("jrt"), get_method("rag")
    prompt, _ = jrt.build(QUESTION, corpus, jrt.Params(k=2))
    rag_prompt, _ = rag.build(QUESTION, corpus, rag.Params(k=2))
    first, second = passages(prompt, "text"), passages(prompt, "repeated")
    assert [s.ids for s in first] == [s.ids for s in second] == [s.ids for s in passages(rag_prompt, "text")]
    text = corpus.lm.tokenizer.decode(prompt.ids)
    assert text.count(f"Question: {QUESTION}") == 2
    # question, context, context, question
    q1 = text.index(QUESTION)
    c1 = text.index(corpus.lm.tokenizer.decode(first[0].ids))
    c2 = text.index(corpus.lm.tokenizer.decode(second[0].ids), c1 + 1)
    q2 = text.index(QUESTION, c2)
    assert q1 < c1 < c2 < q2
    context = sum(len(s.ids) for s in first)
    assert sum(len(s.ids) for s in first + second) == 2 * sum(len(s.ids) for s in passages(rag_prompt, "text"))
    assert len(prompt) - len(rag_prompt) >= context  # the repeat plus the question stated up front
    assert 1.5 < len(prompt) / len(rag_prompt) <= 2.0


def test_jrt_prompt_tokens_about_twice_rags_through_the_workbench(tiny_bench, corpus):
    rag, jrt = tiny_bench.ask(QUESTION, ["rag", "jrt"], knobs={"rag": {"k": 3}, "jrt": {"k": 3}})
    assert rag.sources == jrt.sources  # the same passages
    assert 1.5 < jrt.prompt_tokens / rag.prompt_tokens <= 2.0
    assert jrt.processed_tokens + jrt.cached_tokens == jrt.prompt_tokens and jrt.retrieve_s > 0
    assert [s["mark"] for s in jrt.segments].count("repeated") == [s["kind"] for s in rag.segments].count("passage")


def test_full_context_is_cut_so_both_copies_fit(corpus):
    jrt = get_method("jrt")
    whole, _ = jrt.build(QUESTION, corpus, jrt.Params(context="full"))
    assert not any("truncated" in n for n in jrt.build(QUESTION, corpus, jrt.Params(context="full"))[1].notes)
    prompt, result = jrt.build(QUESTION, corpus, jrt.Params(context="full", max_context_tokens=200))
    assert len(prompt) <= 200 < len(whole)
    first, second = passages(prompt, "text"), passages(prompt, "repeated")
    assert first and [s.ids for s in first] == [s.ids for s in second]
    assert any("per copy" in n for n in result.notes)


def test_unknown_context_knob_is_a_clear_error(corpus):
    from ragdemo.errors import UserError

    jrt = get_method("jrt")
    with pytest.raises(UserError, match="context must be one of rag, full"):
        jrt.build(QUESTION, corpus, jrt.Params(context="everything"))


def recurrent_model(arch: str, vocab: int):
    """Tiny randomly initialised recurrent LMs of the three transformers classes JRT is offered for."""
    from transformers import (Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM, RwkvConfig,
                              RwkvForCausalLM)

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "mamba":
        return MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=64, state_size=8, num_hidden_layers=2,
                                            expand=2, conv_kernel=4, **ids))
    if arch == "mamba2":
        return Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=64, state_size=16, num_hidden_layers=2,
                                              expand=2, head_dim=16, num_heads=8, n_groups=1, conv_kernel=4,
                                              chunk_size=32, **ids))
    return RwkvForCausalLM(RwkvConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                      intermediate_size=128, context_length=2048, **ids))


@pytest.fixture(scope="module", params=["mamba", "mamba2", "rwkv"])
def tiny_recurrent_dir(request, tmp_path_factory, default_model_dir):
    """A 2-layer random recurrent model saved with the default tokenizer: the recurrent path end to end."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    recurrent_model(request.param, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return request.param, str(path)


def test_jrt_end_to_end_on_tiny_recurrent_models(tmp_path, tiny_recurrent_dir, docs_dir):
    arch, model_dir = tiny_recurrent_dir
    bench = Workbench(make_settings(tmp_path / "home", model_dir, max_new_tokens=6))
    bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    assert bench.models.lm.model.config.model_type == arch
    streamed = []
    rag, jrt, retro = bench.ask(QUESTION, ["rag", "jrt", "retro"], knobs={"jrt": {"k": 2}, "rag": {"k": 2}},
                                stream=lambda m, t: streamed.append((m, t)))
    assert not jrt.error and jrt.new_tokens >= 1 and jrt.ttft_s > 0 and jrt.total_s >= jrt.ttft_s
    assert jrt.answer == "".join(t for m, t in streamed if m == "jrt").strip()
    assert 1.5 < jrt.prompt_tokens / rag.prompt_tokens <= 2.0
    assert "recurrent" in retro.error  # retro needs a KV cache: refused with a message, no crash
    method = get_method("jrt")
    assert method.nll(QUESTION, "1889", bench.corpus(), method.Params(k=2)) > 0


def test_cli_ask_rag_retro_jrt_json(tmp_path, tiny_model_dir, docs_dir):
    home = tmp_path / "home"
    run(["ingest", *map(str, sorted(docs_dir.iterdir()))], home, tiny_model_dir)
    out = run(["ask", QUESTION, "--methods", "rag,retro,jrt", "--set", "retro.stride=4", "--set", "jrt.k=3",
               "--set", "rag.k=3", "--json"], home, tiny_model_dir)
    results = json.loads(out.stdout)
    assert [r["method"] for r in results] == ["rag", "retro", "jrt"]
    assert all(not r["error"] and r["prompt_tokens"] > 0 and r["total_s"] > 0 for r in results)
    retro = results[1]
    assert retro["events"][0]["kind"] == "question"
    assert retro["new_tokens"] == 6  # RAGDEMO_MAX_NEW_TOKENS in test_cli.run; one re-retrieval, after token 4
    assert [e["step"] for e in retro["events"] if e["kind"] == "re-retrieval"] == [4]
    assert 1.5 < results[2]["prompt_tokens"] / results[0]["prompt_tokens"] <= 2.0
