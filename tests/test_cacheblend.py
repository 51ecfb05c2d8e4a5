"""CacheBlend-style reuse: r=1 is a full prefill, r=0 is pure reuse, the recomputed set is the asked size and the
highest-deviation tokens; content-keyed chunk caches, honest fields, the CLI contract."""
import json

import pytest
import torch
from transformers import DynamicCache

from ragdemo.engine import kv as kvc
from ragdemo.engine.blend import kv_deviation, selective_recompute
from ragdemo.engine.layers import forward_all, logits
from ragdemo.engine.prefix import instruction_prefix_ids, shared_prefix
from ragdemo.engine.scoring import nll_of_answer
from ragdemo.ingest import ingest_files
from ragdemo.methods import get_method
from ragdemo.methods.base import StorageAccount, params_from
from ragdemo.methods.chunk_artifacts import content_key, token_budget
from ragdemo.store import sha256

QUESTION = "When was the tower completed?"


def ingest(bench, docs_dir, collection="default"):
    """Straight into the store: no default preparation, so each test decides what is prepared."""
    corpus = bench.corpus(collection)
    files = [(p.name, p) for p in sorted(docs_dir.iterdir())]
    ingest_files(bench.store, corpus.collection_id, files, corpus.lm.tokenizer, corpus.embedder,
                 bench.settings.chunk_tokens)
    return corpus


def question_logits(lm, ctx):
    """The question ran in the blend's own pass, after the recomputed passage tokens."""
    with torch.inference_mode():
        return logits(lm, ctx.suffix_hidden)


def full_prefill_logits(lm, ctx):
    """The model reading the identical token sequence as plain text (what rag does)."""
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ctx.prompt.ids])).logits[:, -len(ctx.question_ids):]


def context(corpus, **knobs):
    method = get_method("cacheblend")
    return method._context(QUESTION, corpus, params_from(method.Params, {"k": 4, **knobs}))


@pytest.mark.parametrize("selection_layer,gradual", [(0, False), (1, False), (1, True), (3, False)])
def test_r1_equals_the_full_prefill_of_the_same_prompt(tiny_bench, docs_dir, selection_layer, gradual):
    corpus = ingest(tiny_bench, docs_dir)
    lm = corpus.lm
    full = context(corpus, r=1.0, selection_layer=selection_layer, gradual=gradual)
    want = full_prefill_logits(lm, full)
    assert sum(1 for s in full.prompt.segments if s.kind == "passage") == 4
    torch.testing.assert_close(question_logits(lm, full), want, atol=1e-4, rtol=1e-4)
    # the comparison has teeth: reusing the caches as they are does not give the full prefill
    reused = question_logits(lm, context(corpus, r=0.0))
    assert (reused - want).abs().max() > 1e-2


def test_r1_nll_equals_rag_reading_the_same_tokens(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    method = get_method("cacheblend")
    params = params_from(method.Params, {"k": 4, "r": 1.0})
    ids = method._context(QUESTION, corpus, params).prompt.ids
    assert method.nll(QUESTION, "in 1889", corpus, params) == pytest.approx(
        nll_of_answer(corpus.lm, ids, "in 1889"), abs=1e-4)


def test_r0_equals_pure_reuse_of_the_stored_caches(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    lm, method = corpus.lm, get_method("cacheblend")
    method.prepare(corpus, method.Params())
    ctx = context(corpus, r=0.0)
    # assembled independently: stored blobs, prefix recomputed, keys rotated to where each passage lands
    hits = sorted(corpus.retrieve(QUESTION, 4)[0], key=lambda h: (h["doc_id"], h["ord"]))
    blobs = corpus.store.get_artifacts("cacheblend", lm.model_id, method.digest(lm, method.Params()), [content_key(h) for h in hits])
    passages = [kvc.from_bytes(blobs[content_key(h)], lm.model.dtype, "cpu") for h in hits]
    prefix = kvc.prefix_layers(lm, instruction_prefix_ids(lm.tokenizer))
    starts, at = [], prefix[0][0].shape[2]
    for p in passages:
        starts.append(at)
        at += p.n_tokens
    cache = kvc.cache_from(kvc.placed_layers(lm, prefix, passages, starts))
    with torch.inference_mode():
        want = forward_all(lm, torch.tensor([ctx.question_ids]), cache, at)
    assert at + len(ctx.question_ids) == ctx.next_pos
    torch.testing.assert_close(question_logits(lm, ctx), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(question_logits(lm, context(corpus, r=0.3)), want, atol=1e-3)


def test_more_recompute_comes_closer_to_the_full_prefill(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    lm = corpus.lm
    errors = {}
    for r in (0.0, 0.5):
        ctx = context(corpus, r=r)
        errors[r] = float((question_logits(lm, ctx) - full_prefill_logits(lm, ctx)).abs().max())
    assert errors[0.5] < errors[0.0]


@pytest.mark.parametrize("r", [0.05, 0.15, 0.3, 0.5])
@pytest.mark.parametrize("gradual", [False, True])
def test_recomputed_set_has_the_asked_size(tiny_bench, docs_dir, r, gradual):
    corpus = ingest(tiny_bench, docs_dir)
    ctx = context(corpus, r=r, gradual=gradual)
    n = sum(len(s.ids) for s in ctx.prompt.segments if s.kind == "passage")
    flags = [f for row in ctx.recomputed for f in row]
    assert len(flags) == n and sum(flags) == token_budget(r, n) > 0


def test_selected_tokens_are_those_whose_reused_kv_deviates_most_at_the_selection_layer(tiny_lm):
    lm, layer, keep = tiny_lm, 2, 9
    tok = lm.tokenizer
    prefix_ids = instruction_prefix_ids(tok)
    chunks = [tok("Gustave Eiffel's company designed and built the tower.", add_special_tokens=False)["input_ids"],
              tok("It was completed in 1889 as the entrance to the World's Fair.", add_special_tokens=False)["input_ids"]]
    prefix = kvc.prefix_layers(lm, prefix_ids)
    passages = [kvc.capture(lm, prefix, ids)[0] for ids in chunks]
    starts = [len(prefix_ids), len(prefix_ids) + len(chunks[0])]
    reused = kvc.placed_layers(lm, prefix, passages, starts)
    ids = chunks[0] + chunks[1]
    full = DynamicCache()
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([prefix_ids + ids]), past_key_values=full, use_cache=True)
        # layers below the selection layer run for every token, so the selection layer sees exact inputs
        deviation = kv_deviation(reused[layer][0][0, :, len(prefix_ids):], reused[layer][1][0, :, len(prefix_ids):],
                                 full.layers[layer].keys[0, :, len(prefix_ids):], full.layers[layer].values[0, :, len(prefix_ids):])
        blend = selective_recompute(lm, [(k.clone(), v.clone()) for k, v in reused], ids, len(prefix_ids), keep, layer)
    want = sorted(deviation.topk(keep).indices.tolist())
    assert blend.recomputed == want
    assert blend.token_layers == len(ids) * (layer + 1) + keep * (lm.n_layers - layer - 1)
    # the first chunk follows the prefix in capture and prompt alike: its reused KV is already (nearly) exact
    assert float(deviation[:len(chunks[0])].max()) < 1e-6 < float(deviation[len(chunks[0]):].max())


class _RowCounter:
    """Rows each decoder layer's MLP and the vocabulary projection ran over (forward hooks)."""

    def __init__(self, lm):
        self.mlp = {i: [] for i in range(lm.n_layers)}
        self.head = []
        self.handles = [layer.mlp.register_forward_hook(self._hook(self.mlp[i]))
                        for i, layer in enumerate(lm.model.model.layers)]
        self.handles.append(lm.model.lm_head.register_forward_hook(self._hook(self.head)))

    @staticmethod
    def _hook(into):
        return lambda module, args, out: into.append(int(args[0].shape[1]))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("r,gradual", [(0.0, False), (0.15, False), (0.3, True), (1.0, False)])
def test_each_layer_runs_once_over_the_selected_tokens_and_the_question(tiny_bench, docs_dir, r, gradual):
    """The cost the method claims: below the selection layer every passage token, from it on only the selected
    ones, the question in the same pass (each layer's weights read once before decoding), and at the selection
    layer the unselected tokens only get their KV projected (no MLP)."""
    corpus = ingest(tiny_bench, docs_dir)
    lm, method = corpus.lm, get_method("cacheblend")
    method.prepare(corpus, method.Params())
    shared_prefix(lm, instruction_prefix_ids(lm.tokenizer))  # the prefix memo is warm, as in a served answer
    counter = _RowCounter(lm)
    try:
        ctx = context(corpus, r=r, gradual=gradual, selection_layer=1)
    finally:
        counter.close()
    n = sum(len(s.ids) for s in ctx.prompt.segments if s.kind == "passage")
    q, keep = len(ctx.question_ids), token_budget(r, n)
    if keep == 0:
        want = [q] * lm.n_layers
    elif keep == n:
        want = [n + q] * lm.n_layers
    elif gradual:
        want = [n + q, 2 * keep + q] + [keep + q] * (lm.n_layers - 2)
    else:
        want = [n + q] + [keep + q] * (lm.n_layers - 1)
    assert [counter.mlp[i] for i in range(lm.n_layers)] == [[w] for w in want]
    assert counter.head == []  # no logits while building the context


def test_answer_projects_only_the_last_position_onto_the_vocabulary(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    lm = corpus.lm
    tiny_bench.ask(QUESTION, ["cacheblend"])  # prepared and warm
    counter = _RowCounter(lm)
    try:
        result, = tiny_bench.ask(QUESTION, ["cacheblend"])
    finally:
        counter.close()
    assert not result.error and counter.head and set(counter.head) == {1}


def test_answer_fields_preparation_outside_ttft_and_recomputed_marks(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    lm, method = corpus.lm, get_method("cacheblend")
    first, = tiny_bench.ask(QUESTION, ["cacheblend"])
    assert not first.error and first.prepare_s > 0 and any("not prepared yet" in n for n in first.notes)
    again, = tiny_bench.ask(QUESTION, ["cacheblend"])
    assert again.prepare_s == 0 and not any("not prepared yet" in n for n in again.notes)
    passages = [s for s in again.segments if s["kind"] == "passage"]
    n = sum(s["n_tokens"] for s in passages)
    recomputed = sum(sum(s["recomputed"]) for s in passages)
    assert recomputed == token_budget(0.15, n) and all(len(s["tokens"]) == len(s["recomputed"]) == s["n_tokens"] for s in passages)
    assert all(s["mark"] == "cached" for s in passages)
    question, prefix = again.segments[-1]["n_tokens"], again.segments[0]["n_tokens"]
    assert again.prompt_tokens == prefix + n + question
    layers = lm.n_layers
    # selection layer 1: layers 0-1 computed for every passage token (the KV projection at layer 1 counted whole),
    # the recomputed ones' upper layers too; everything else read from the chunk caches; the prefix from the memo
    assert again.processed_tokens == pytest.approx(question + (2 * n + recomputed * (layers - 2)) / layers, abs=0.01)
    assert again.cached_tokens == pytest.approx(prefix + (n - recomputed) * (layers - 2) / layers, abs=0.01)
    assert again.overhead_tokens == pytest.approx(recomputed / layers, abs=0.01)  # their selection projection, redone
    assert again.processed_tokens < again.prompt_tokens
    account = method.storage(corpus, method.Params())
    assert isinstance(account, StorageAccount) and account.tokens == corpus.n_tokens()
    assert again.bytes_per_token == pytest.approx(account.bytes_per_token, abs=0.1)
    assert again.chunk_bytes_per_token == pytest.approx(again.storage_bytes / n, abs=0.1)


def test_chunk_caches_are_keyed_by_content_and_accounted_once(tiny_bench, docs_dir):
    a = ingest(tiny_bench, docs_dir, "a")
    lm, method = a.lm, get_method("cacheblend")
    fp16 = method.Params(storage="fp16")  # the byte count below is fp16's
    assert method.storage(a, fp16).chunk_bytes == 0
    method.prepare(a, fp16)
    rows = tiny_bench.store.rows("SELECT key, nbytes FROM artifacts WHERE method = 'cacheblend'")
    texts = {c["text"] for c in a.chunks()}
    assert {r["key"] for r in rows} == {"text:" + sha256(t.encode()) for t in texts}
    account = method.storage(a, fp16)
    assert account.chunk_bytes == sum(r["nbytes"] for r in rows) > 0 and account.shared == {}
    # one stored token of SmolLM-shaped KV: layers x KV heads x head_dim x (K, V) x fp16
    n_tokens = sum(len(lm.tokenizer(t.strip() + "\n\n", add_special_tokens=False)["input_ids"]) for t in texts)
    per_token = lm.n_layers * 2 * 16 * 2 * 2
    assert n_tokens * per_token < account.chunk_bytes < n_tokens * per_token + 2000 * len(texts)
    b = ingest(tiny_bench, docs_dir, "b")  # same documents in another collection: nothing new to build
    method.prepare(b, fp16)
    assert tiny_bench.store.value("SELECT COUNT(*) FROM artifacts WHERE method = 'cacheblend'") == len(rows)
    assert method.storage(b, fp16).chunk_bytes == account.chunk_bytes


def test_bad_knobs_are_one_line_errors(tiny_bench, docs_dir):
    from ragdemo.errors import UserError

    corpus = ingest(tiny_bench, docs_dir)
    method = get_method("cacheblend")
    for knobs in ({"r": 1.5}, {"selection_layer": 4}, {"k": 0}):
        with pytest.raises(UserError):
            method.answer(QUESTION, corpus, params_from(method.Params, knobs))


def test_cli_ask_cacheblend_and_lingua_json(tmp_path, tiny_model_dir, docs_dir):
    from ragdemo.workbench import Workbench
    from tests.conftest import make_settings
    from tests.test_cli import run

    home = tmp_path / "home"
    bench = Workbench(make_settings(home, tiny_model_dir))
    ingest(bench, docs_dir, "demo")
    bench.store.close()
    asked = run(["ask", QUESTION, "--collection", "demo", "--methods", "cacheblend,lingua", "--json",
                 "--set", "cacheblend.r=0.3"], home, tiny_model_dir)
    blend, lingua = json.loads(asked.stdout)  # stdout is the JSON array and nothing else
    assert (blend["method"], lingua["method"]) == ("cacheblend", "lingua")
    assert not blend["error"] and not lingua["error"] and blend["answer"] is not None
    assert blend["cached_tokens"] > 0 and blend["processed_tokens"] < blend["prompt_tokens"]
    assert any("r=0.3" in n for n in blend["notes"])
    passages = [s for s in lingua["segments"] if s["kind"] == "passage"]
    assert lingua["prompt_tokens"] < sum(s["n_tokens"] for s in lingua["segments"])
    assert sum(s["kept_tokens"] for s in passages) == token_budget(0.5, sum(s["n_tokens"] for s in passages))
