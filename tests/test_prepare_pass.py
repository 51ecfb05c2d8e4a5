"""The shared preparation pass (engine/prepare_pass.py, methods/preparation.py): a batched, padded forward gives
each chunk what its own forward gives, every chunk runs once for every method, batches are written whole, and a
Cancel between batches leaves only whole artifacts."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ragdemo.engine import kv as kvc
from ragdemo.engine import prepare_pass
from ragdemo.engine.prefix import instruction_prefix_ids, shared_prefix
from ragdemo.engine.prepare_pass import Needs, PassRequest, SharedPass, forward_chunks
from ragdemo.engine.prompt import encode, passage_ids
from ragdemo.ingest import ingest_files
from ragdemo.methods import get_method
from ragdemo.methods.base import params_from
from ragdemo.methods.chunk_artifacts import content_key
from safetensors.numpy import load as load_numpy

TEXTS = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
         "It was completed in 1889.",
         "Gustave Eiffel's company designed and built the tower as the entrance to the World's Fair of that year, "
         "and it has since become a global cultural icon of France.",
         "Bananas are yellow."]
KNOBS = {"btr": {"split": "2"}, "lloco": {"storage": "fp16"}}  # the tiny model has 4 layers; exact comparisons want fp16 KV
PREPARED = ["btr", "lloco", "cacheblend", "lingua"]


def _eager(tiny_model_dir):
    """The same weights with eager attention: the reference exposes its attention weights."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def test_batched_pass_equals_each_chunk_read_alone_by_the_plain_model(tiny_lm, tiny_model_dir):
    """Chunks of different lengths in one padded batch: states at the split, every layer's KV, surprisal and the
    reconstruction scores each equal what the plain model computes over [prefix, chunk, cue, chunk] alone."""
    lm, split = tiny_lm, 2
    prefix_ids = instruction_prefix_ids(lm.tokenizer)
    chunks = [passage_ids(lm.tokenizer, t) for t in TEXTS]
    assert len({len(c) for c in chunks}) == len(chunks)  # really padded
    cue = encode(lm.tokenizer, kvc.RECONSTRUCT_CUE)
    needs = Needs(states_at=frozenset({split}), kv=True, surprisal=True, reconstruct=True)
    got = forward_chunks(lm, shared_prefix(lm, prefix_ids), chunks, needs)
    eager = _eager(tiny_model_dir)
    start, kv_heads = len(prefix_ids), lm.model.config.num_key_value_heads
    for ids, out in zip(chunks, got):
        n = len(ids)
        cache = DynamicCache()
        with torch.inference_mode():
            ref = eager(input_ids=torch.tensor([prefix_ids + ids + cue + ids]), past_key_values=cache, use_cache=True,
                        output_hidden_states=True, output_attentions=True)
        torch.testing.assert_close(out.states[split], ref.hidden_states[split][0, start:start + n], atol=1e-4, rtol=1e-4)
        placed = kvc.rotate_keys(lm, out.kv.keys, out.kv.offsets + start)  # back where the reference computed them
        for layer in range(lm.n_layers):
            torch.testing.assert_close(placed[layer], cache.layers[layer].keys[0, :, start:start + n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.kv.values[layer], cache.layers[layer].values[0, :, start:start + n],
                                       atol=1e-4, rtol=1e-4)
            repeat = ref.attentions[layer][0, :, start + n:start + 2 * n + len(cue), start:start + n].amax(dim=1)
            torch.testing.assert_close(out.scores[layer], repeat.view(kv_heads, -1, n).amax(dim=1), atol=1e-5, rtol=1e-4)
        log_p = torch.log_softmax(ref.logits[0, start - 1:start + n - 1].float(), dim=-1)
        want = -log_p.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(out.surprisal, want, atol=1e-4, rtol=1e-4)
        assert out.kv.n_tokens == n and out.kv.keys.dtype == torch.float32


def test_each_chunk_runs_once_with_the_union_of_what_its_requests_need(tiny_lm, monkeypatch):
    """Two requests sharing a chunk: it is forwarded once, with both needs, and both get the same result; a chunk
    only one request wants gets only that request's needs (states alone run only the layers below the split)."""
    lm = tiny_lm
    prefix = tuple(instruction_prefix_ids(lm.tokenizer))
    ids = {t: passage_ids(lm.tokenizer, t) for t in TEXTS}
    calls = []
    real = prepare_pass.forward_chunks

    def spy(lm_, prefix_state, sequences, needs, cue=None):
        calls.append((needs, [tuple(s) for s in sequences]))
        return real(lm_, prefix_state, sequences, needs, cue)

    monkeypatch.setattr(prepare_pass, "forward_chunks", spy)
    states_only = PassRequest(Needs(states_at=frozenset({1})), {t: ids[t] for t in TEXTS[:3]}, prefix)
    kv = PassRequest(Needs(kv=True), {t: ids[t] for t in TEXTS[2:]}, prefix)
    shared = SharedPass(lm, [states_only, kv])
    batches = list(shared.batches())
    forwarded = [seq for _, seqs in calls for seq in seqs]
    assert sorted(forwarded) == sorted(tuple(s) for s in ids.values())  # every chunk once
    by_needs = {needs: {s for s in seqs} for needs, seqs in calls}
    assert by_needs[Needs(states_at=frozenset({1}), kv=True)] == {tuple(ids[TEXTS[2]])}
    assert by_needs[Needs(states_at=frozenset({1}))] == {tuple(ids[t]) for t in TEXTS[:2]}
    assert Needs(states_at=frozenset({1})).depth(lm.n_layers) == 1
    first = {k: v for b in batches for k, v in b.taken[0]}
    second = {k: v for b in batches for k, v in b.taken[1]}
    assert set(first) == set(TEXTS[:3]) and set(second) == set(TEXTS[2:])
    assert first[TEXTS[2]] is second[TEXTS[2]] and first[TEXTS[2]].kv is not None
    assert first[TEXTS[0]].kv is None and 1 in first[TEXTS[0]].states
    assert batches[-1].done == shared.total == sum(len(s) for s in ids.values())


def _collection(bench, docs_dir, name="default"):
    corpus = bench.corpus(name)
    files = [(p.name, p) for p in sorted(docs_dir.iterdir())]
    ingest_files(bench.store, corpus.collection_id, files, corpus.lm.tokenizer, corpus.embedder, bench.settings.chunk_tokens)
    return corpus


def _blobs(corpus):
    rows = corpus.store.rows("SELECT method, params_hash, key, blob FROM artifacts ORDER BY method, params_hash, key")
    return {(r["method"], r["params_hash"], r["key"]): r["blob"] for r in rows}


def test_joint_preparation_equals_each_method_prepared_alone_chunk_by_chunk(tiny_bench, docs_dir, monkeypatch):
    """Every method together in padded batches against each method alone with one chunk per forward (the old
    per-chunk path): the same artifacts under the same keys, equal within fp32 round-off."""
    joint = _collection(tiny_bench, docs_dir, "joint")
    tiny_bench.prepare(PREPARED, "joint", KNOBS)
    alone = _collection(tiny_bench, docs_dir, "alone")
    together = _blobs(joint)
    tiny_bench.store.db.execute("DELETE FROM artifacts")  # the second collection must not find the first one's
    joint.lm.__dict__.get("memos", {}).clear()  # nor BTR's states or LLoCO's captures kept in memory
    monkeypatch.setattr(prepare_pass, "BATCH_TOKENS", 1)
    for name in PREPARED:
        tiny_bench.prepare([name], "alone", KNOBS)
    single = _blobs(alone)

    def signature(key):
        """BTR's decoder is keyed by the collection's content signature (another collection, another key), and its
        codes by the decoder's digest (fp16 round-off of equal fits can differ): compare them by chunk."""
        method, params_hash, name = key
        if method != "btr":
            return key
        return method, "", "decoder" if name.startswith("decoder:") else name

    assert sorted(map(signature, together)) == sorted(map(signature, single))
    by_sig = {signature(k): v for k, v in single.items()}
    for key, blob in together.items():
        other = by_sig[signature(key)]
        if key[0] in ("cacheblend", "lloco"):
            a, b = kvc.from_bytes(blob, torch.float32, "cpu"), kvc.from_bytes(other, torch.float32, "cpu")
            assert torch.equal(a.offsets, b.offsets)
            torch.testing.assert_close(a.keys, b.keys, atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(a.values, b.values, atol=2e-3, rtol=1e-3)
        elif key[0] == "lingua":
            torch.testing.assert_close(torch.from_numpy(load_numpy(blob)["surprisal"]).float(),
                                       torch.from_numpy(load_numpy(other)["surprisal"]).float(), atol=1e-2, rtol=1e-3)
        else:  # btr codes and decoder: bit patterns of states equal to ~1e-6
            differ = sum(x != y for x, y in zip(blob, other))
            assert len(blob) == len(other) and differ <= max(2, len(blob) // 500), (key, differ)


def test_every_chunk_is_forwarded_once_for_all_methods_and_written_a_batch_at_a_time(tiny_bench, docs_dir, monkeypatch):
    corpus = _collection(tiny_bench, docs_dir)
    corpus.lm.__dict__.get("memos", {}).clear()  # no state or capture kept from another test: all come from the pass
    rows, writes, counted = [], [], [0]
    real = prepare_pass.forward_chunks
    monkeypatch.setattr(prepare_pass, "forward_chunks",
                        lambda *a, **k: rows.extend(a[2]) or real(*a, **k))
    real_put = corpus.store.put_artifacts
    monkeypatch.setattr(type(corpus.store), "put_artifacts", 
                        lambda self, batch: writes.append(sorted({r.method for r in batch}))
                        or counted.__setitem__(0, counted[0] + len(batch)) or real_put(batch))
    messages = []
    tiny_bench.prepare(PREPARED, knobs=KNOBS, progress=lambda f, m: messages.append(m))
    unique = {content_key(c) for c in corpus.chunks()}
    assert len(rows) == len(unique)  # BTR's states, both caches and the surprisal from one forward per chunk
    batches = sum(1 for m in messages if m.startswith("forward pass:") and "tokens/s" in m)
    # one transaction per batch, holding every method's rows, + BTR's decoder and codes once it is fitted
    assert 1 <= batches and len(writes) == batches + 1
    assert writes[0] == ["cacheblend", "lingua", "lloco"] and writes[-1] == ["btr"]
    assert counted[0] == len(corpus.store.rows("SELECT key FROM artifacts"))
    assert any("btr" in m and "decoder" in m for m in messages)


def test_cancel_between_batches_keeps_whole_batches_and_a_rerun_finishes(tiny_bench, docs_dir, monkeypatch):
    corpus = _collection(tiny_bench, docs_dir)
    monkeypatch.setattr(prepare_pass, "BATCH_TOKENS", 300)  # several batches

    class Cancelled(Exception):
        pass

    def cancel_after_first_batch(fraction, message):
        if message.startswith("forward pass:") and "tokens/s" in message:
            raise Cancelled()

    with pytest.raises(Cancelled):
        tiny_bench.prepare(["cacheblend", "lingua"], progress=cancel_after_first_batch)
    assert not corpus.lm.lock.locked()  # the model is free again
    stored = corpus.store.rows("SELECT method, key FROM artifacts")
    unique = {content_key(c) for c in corpus.chunks()}
    by_method = {m: {r["key"] for r in stored if r["method"] == m} for m in ("cacheblend", "lingua")}
    assert 0 < len(by_method["cacheblend"]) < len(unique)
    assert by_method["cacheblend"] == by_method["lingua"]  # the batch's rows were written together
    for blob in corpus.store.rows("SELECT blob FROM artifacts WHERE method = 'cacheblend'"):
        kvc.from_bytes(blob["blob"], torch.float32, "cpu")  # whole
    lines = tiny_bench.prepare(["cacheblend", "lingua"])
    assert all("prepared" in line for line in lines)
    for method in ("cacheblend", "lingua"):
        keys = {r["key"] for r in corpus.store.rows("SELECT key FROM artifacts WHERE method = ?", (method,))}
        assert keys == unique


def test_answer_time_preparation_of_missing_chunks_goes_through_the_same_pass(tiny_bench, docs_dir, monkeypatch):
    corpus = _collection(tiny_bench, docs_dir)
    seen = []
    real = prepare_pass.forward_chunks
    monkeypatch.setattr(prepare_pass, "forward_chunks", lambda *a, **k: seen.append(len(a[2])) or real(*a, **k))
    method = get_method("cacheblend")
    params = params_from(method.Params, {"k": 3, "max_new_tokens": 2})
    result = method.answer("When was the tower completed?", corpus, params)
    assert result.prepare_s > 0 and sum(seen) == 3 and len(seen) == 1  # the three hits in one batch


def test_another_lloco_ratio_reuses_the_full_caches_kept_in_memory(tiny_bench, docs_dir, monkeypatch):
    """Preparing c=2 right after c=4 compresses the full caches kept from the first pass: no second forward, and
    the same artifacts as a c=2 preparation from nothing."""
    corpus = _collection(tiny_bench, docs_dir)
    corpus.lm.__dict__.get("memos", {}).clear()
    forwards = []
    real = prepare_pass.forward_chunks
    monkeypatch.setattr(prepare_pass, "forward_chunks", lambda *a, **k: forwards.append(len(a[2])) or real(*a, **k))
    tiny_bench.prepare(["lloco"], knobs={"lloco": {"c": "4", "storage": "fp16"}})
    assert forwards
    forwards.clear()
    tiny_bench.prepare(["lloco"], knobs={"lloco": {"c": "2", "storage": "fp16"}})
    assert forwards == []
    from_memory = {(r["params_hash"], r["key"]): r["blob"]
                   for r in corpus.store.rows("SELECT params_hash, key, blob FROM artifacts WHERE method = 'lloco'")}
    tiny_bench.store.db.execute("DELETE FROM artifacts")
    corpus.lm.__dict__.get("memos", {}).clear()
    tiny_bench.prepare(["lloco"], knobs={"lloco": {"c": "2", "storage": "fp16"}})
    assert forwards
    fresh = {(r["params_hash"], r["key"]): r["blob"]
             for r in corpus.store.rows("SELECT params_hash, key, blob FROM artifacts WHERE method = 'lloco'")}
    assert fresh
    for k, blob in fresh.items():  # equal tensors (safetensors may write its metadata keys in another order)
        a, b = kvc.from_bytes(from_memory[k], torch.float32, "cpu"), kvc.from_bytes(blob, torch.float32, "cpu")
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
