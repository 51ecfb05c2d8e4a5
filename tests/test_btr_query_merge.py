"""BTR closer to the paper (issue 14): the query-aware layout, ToMe merging in every upper layer with
proportional attention, and the card's tables rendered from result files."""
import random
from contextlib import nullcontext

import pytest
import torch

from ragdemo.engine.generate import decode_loop, generate
from ragdemo.engine.layers import CAUSAL, embed, positions, run_layers
from ragdemo.engine.lora import cloze_example, cloze_question, distill_kl, teacher_logits
from ragdemo.engine.merging import merge_within_groups, sized
from ragdemo.engine.prefix import compute_prefix
from ragdemo.engine.prompt import lead_question_ids, question_ids
from ragdemo.engine.scoring import nll_of_answer
from ragdemo.methods import get_method
from ragdemo.engine.prefix import instruction_ids
from ragdemo.methods.btr import btr_forward, decode_step, distill_loss, lower_states


def btr_parts(lm):
    """(instruction prefix, two passages, lead question copy, final question) in ids: the query-aware layout's parts."""
    tok = lm.tokenizer
    passages = [tok("The Eiffel Tower was completed in 1889 in Paris.\n\n", add_special_tokens=False)["input_ids"],
                tok("Bananas are yellow and grow in warm places.\n\n", add_special_tokens=False)["input_ids"]]
    return instruction_ids(lm), passages, lead_question_ids(tok, "When was it completed?"), \
        question_ids(tok, "When was it completed?")


# ------------------------------------------------------------------------------------ query-aware layout

@pytest.mark.parametrize("cached_prefix", [False, True])
def test_query_aware_split_zero_equals_the_full_forward_of_the_same_tokens(tiny_lm, cached_prefix):
    prefix, passages, lead, question = btr_parts(tiny_lm)
    ids = prefix + lead + passages[0] + passages[1] + question
    states = [embed(tiny_lm, torch.tensor([p]))[0].float() for p in passages]
    prefix_layers = compute_prefix(tiny_lm, prefix).layers if cached_prefix else None
    with torch.inference_mode():
        full = tiny_lm.model(input_ids=torch.tensor([ids])).logits
        fwd = btr_forward(tiny_lm, prefix, states, question, split=0, want=len(question), prefix=prefix_layers,
                          lead_ids=lead)
    assert torch.allclose(fwd.logits, full[:, -len(question):], atol=1e-4)
    assert fwd.next_pos == len(ids)
    assert fwd.token_layers == (len(ids) - (len(prefix) if cached_prefix else 0)) * tiny_lm.n_layers
    plain = generate(tiny_lm, ids, 6, 0.0)
    btr = decode_loop(tiny_lm, fwd.cache, fwd.logits[:, -1:], fwd.next_pos, 6, 0.0, step=decode_step(tiny_lm))
    assert btr.ids == plain.ids


def test_query_side_runs_the_lower_layers_alone_at_its_final_positions(tiny_lm):
    """Below the split the cache holds [prefix, lead, question] only, computed as if the passages were absent but
    at the positions they have in the whole prompt; above it, every token."""
    prefix, passages, lead, question = btr_parts(tiny_lm)
    split, n = 2, sum(map(len, passages))
    states = [lower_states(tiny_lm, prefix, p, split) for p in passages]
    with torch.inference_mode():
        fwd = btr_forward(tiny_lm, prefix, states, question, split=split, lead_ids=lead)
        query_side = prefix + lead + question
        pos = list(range(len(prefix) + len(lead))) + list(range(len(prefix) + len(lead) + n, fwd.next_pos))
        alone = tiny_lm.model(input_ids=torch.tensor([query_side]), position_ids=torch.tensor([pos]), use_cache=True)
    for layer in range(split):
        assert torch.allclose(fwd.cache.layers[layer].keys, alone.past_key_values.layers[layer].keys, atol=1e-5)
    assert [layer.keys.shape[-2] for layer in fwd.cache.layers] == [len(query_side)] * split + [fwd.next_pos] * 2


def test_the_query_side_reads_each_lower_layer_once(tiny_lm):
    """Lead and question go through layers [0, split) in one call: a short prefill costs mostly reading the
    layer's weights, so a second call per layer was measured as tens of ms on the real model."""
    prefix, passages, lead, question = btr_parts(tiny_lm)
    states = [lower_states(tiny_lm, prefix, p, 2) for p in passages]
    cached = compute_prefix(tiny_lm, prefix).layers
    calls = []
    handle = tiny_lm.model.model.layers[0].register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        with torch.inference_mode():
            btr_forward(tiny_lm, prefix, states, question, split=2, prefix=cached, lead_ids=lead)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_passages_attend_to_the_question_only_in_the_upper_layers_and_only_when_query_aware(tiny_lm):
    """Two questions that differ in one token. Query-aware: the passages' keys entering the first upper layer are
    the same (their stored states are query-agnostic), one layer later they differ (they read the question).
    Today's layout: passages never see the question, so their keys are the same in every layer."""
    prefix, passages, lead, question = btr_parts(tiny_lm)
    other_lead = lead[:2] + [lead[2] + 1] + lead[3:]
    other_question = question[:2] + [question[2] + 1] + question[3:]
    states = [lower_states(tiny_lm, prefix, p, 2) for p in passages]
    n = sum(map(len, passages))
    with torch.inference_mode():
        one = btr_forward(tiny_lm, prefix, states, question, split=2, lead_ids=lead)
        two = btr_forward(tiny_lm, prefix, states, other_question, split=2, lead_ids=other_lead)
        old_one = btr_forward(tiny_lm, prefix, states, question, split=2)
        old_two = btr_forward(tiny_lm, prefix, states, other_question, split=2)

    def passage_keys(fwd, layer, start):
        return fwd.cache.layers[layer].keys[..., start:start + n, :]

    a = len(prefix) + len(lead)
    assert torch.allclose(passage_keys(one, 2, a), passage_keys(two, 2, a), atol=1e-6)
    assert not torch.allclose(passage_keys(one, 3, a), passage_keys(two, 3, a), atol=1e-4)
    for layer in (2, 3):
        assert torch.allclose(passage_keys(old_one, layer, len(prefix)), passage_keys(old_two, layer, len(prefix)),
                              atol=1e-6)


def test_distillation_teacher_and_student_share_the_query_aware_layout(tiny_lm):
    """At split 0 with float states the student is the teacher, so the KL is 0, but only if both read the lead."""
    prefix, passages, lead, question = btr_parts(tiny_lm)
    states = [embed(tiny_lm, torch.tensor([p]))[0].float() for p in passages]
    with torch.no_grad():
        same = distill_loss(tiny_lm, nullcontext, prefix, passages, states, question, 0, lead).item()
        student = btr_forward(tiny_lm, prefix, states, question, 0, len(question), lead_ids=lead).logits[0]
        mismatched = distill_kl(student, teacher_logits(tiny_lm, nullcontext, prefix, passages, question)).item()
    assert abs(same) < 1e-6 and mismatched > 1e-5  # random tiny model: small logits, but 10^4 apart


def test_cloze_question_gives_the_same_example_as_before():
    from transformers import AutoTokenizer

    from ragdemo.config import Settings
    from ragdemo.models.lm import converted_default_dir

    tok = AutoTokenizer.from_pretrained(converted_default_dir(Settings().cache_dir))
    chunks = [{"chunk_id": i, "doc_id": 0, "ord": i, "text": f"Sentence number {i} says that {i * 7} is a number."}
              for i in range(6)]
    picked, text, answer = cloze_question(tok, chunks, 3, random.Random(4))
    again = cloze_example(tok, chunks, 3, random.Random(4))
    assert again == (picked, question_ids(tok, text), answer) and len(picked) == 3


@pytest.fixture
def ingested(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    return tiny_bench


def test_query_aware_plan_nll_and_answer(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    assert method.Params().query_aware is True and method.Params().merge_mode == "once"  # the defaults
    params = method.Params(split=0, bits=16, calibrate=False, k=2, query_aware=True)
    prompt = method._plan("When was the tower completed?", corpus, params).prompt
    assert [s.kind for s in prompt.segments] == ["prefix", "question", "passage", "passage", "question"]
    assert prompt.segments[1].ids == lead_question_ids(corpus.lm.tokenizer, "When was the tower completed?")
    expected = nll_of_answer(corpus.lm, prompt.ids, "in 1889")
    assert method.nll("When was the tower completed?", "in 1889", corpus, params) == pytest.approx(expected, abs=2e-3)
    result = method.answer("When was the tower completed?", corpus, method.Params(split=2, k=2, query_aware=True,
                                                                                    max_new_tokens=3))
    assert not result.error and result.new_tokens > 0 and any("query-aware" in n for n in result.notes)
    assert result.prompt_tokens == sum(s["n_tokens"] for s in result.segments)


def test_query_aware_lora_is_its_own_adapter_and_trains_with_the_lead(ingested, monkeypatch):
    import ragdemo.methods.btr.training as btr_module  # where distill_loss reads the teacher

    corpus = ingested.corpus()
    method = get_method("btr")
    leads = []
    real = btr_module.teacher_logits

    def spy(lm, off, prefix, passages, query, lead_ids=()):
        leads.append(list(lead_ids))
        return real(lm, off, prefix, passages, query, lead_ids)

    monkeypatch.setattr(btr_module, "teacher_logits", spy)
    aware = method.Params(split=2, bits=1, k=2, lora_steps=2, query_aware=True)
    method.finetune(corpus, aware)
    assert len(leads) == 2 and all(lead and corpus.lm.tokenizer.decode(lead).startswith("Question:") for lead in leads)
    assert method._plan("Where?", corpus, aware).adapter
    assert method._plan("Where?", corpus, method.Params(split=2, bits=1, k=2, lora_steps=2, query_aware=False)).adapter is None


# ------------------------------------------------------------------------------ merging in every layer

def _groups(*spec):
    return torch.tensor([g for g, count in spec for _ in range(count)])


def test_zero_ratio_is_the_identity():
    tokens = sized(torch.randn(1, 12, 8), torch.arange(12)[None], _groups((-1, 2), (0, 5), (1, 4), (-1, 1)))
    merged, removed = merge_within_groups(tokens, 0.0)
    assert removed == 0 and merged is tokens


def test_sizes_sum_to_each_passage_and_query_tokens_are_untouched():
    torch.manual_seed(0)
    group = _groups((-1, 3), (0, 20), (1, 9), (2, 30), (-1, 4))
    h = torch.randn(1, len(group), 16)
    tokens = sized(h, torch.arange(len(group))[None], group)
    lengths = {0: 20, 1: 9, 2: 30}
    spans = {g: (int((group == g).nonzero().min()), int((group == g).nonzero().max())) for g in lengths}
    total = 0
    for _ in range(8):
        tokens, removed = merge_within_groups(tokens, 0.2)
        total += removed
        for g, length in lengths.items():
            mine = tokens.group == g
            assert float(tokens.size[mine].sum()) == length
            low, high = spans[g]
            assert int(tokens.pos[0, mine].min()) >= low and int(tokens.pos[0, mine].max()) <= high
        query = tokens.group < 0
        assert torch.equal(tokens.hidden[0, query], h[0, group < 0]) and torch.equal(tokens.pos[0, query],
                                                                                     torch.tensor([0, 1, 2, 62, 63, 64, 65]))
        assert bool((tokens.size[query] == 1).all())
    assert total == len(group) - len(tokens.group) and total > 20


def test_merging_never_crosses_passages_even_for_identical_tokens():
    h = torch.randn(1, 6, 8)
    h[0, 2] = h[0, 0]  # token 2 (passage 1) is identical to token 0 (passage 0): still never merged together
    h[0, 3] = h[0, 1]
    group = _groups((0, 2), (1, 4))
    merged, removed = merge_within_groups(sized(h, torch.arange(6)[None], group), 0.5)
    assert removed == 3  # int(0.5 * 2) = 1 in passage 0, int(0.5 * 4) = 2 in passage 1
    assert merged.size[merged.group == 0].tolist() == [2.0] and float(merged.size[merged.group == 1].sum()) == 4
    assert torch.allclose(merged.hidden[0, 0], (h[0, 0] + h[0, 1]) / 2)  # folded into its own passage's token 1


def test_merged_state_is_the_size_weighted_mean():
    h = torch.zeros(1, 4, 2)
    h[0, :, 0] = torch.tensor([1.0, 2.0, 1.0, 1.0])  # tokens 0 and 1 point the same way: the best pair
    h[0, :, 1] = torch.tensor([0.0, 0.0, 0.5, -0.5])
    tokens = sized(h, torch.arange(4)[None], _groups((0, 4)))
    tokens.size[:] = torch.tensor([3.0, 1.0, 1.0, 1.0])
    merged, removed = merge_within_groups(tokens, 0.25)  # one fold: token 0 (size 3) into its later partner
    assert removed == 1 and merged.size.tolist() == [4.0, 1.0, 1.0]
    assert torch.allclose(merged.hidden[0, 0], (3 * h[0, 0] + h[0, 1]) / 4)


def test_proportional_attention_two_identical_tokens_equal_one_of_size_two(tiny_lm):
    """[a, x, x, b] with both x at the same position, against [a, x (size 2), b] with log 2 on x's logits: every
    later token gets the same output, in a prefill and in a decoded step after it."""
    torch.manual_seed(1)
    d = tiny_lm.model.config.hidden_size
    a, x, b, c = (torch.randn(1, 1, d) for _ in range(4))
    unmerged = torch.cat([a, x, x, b], dim=1)
    tokens = sized(unmerged, torch.tensor([[0, 1, 1, 2]]), _groups((-1, 1), (0, 2), (-1, 1)))
    merged, removed = merge_within_groups(tokens, 0.5)
    assert removed == 1 and merged.size.tolist() == [1.0, 2.0, 1.0] and merged.pos.tolist() == [[0, 1, 2]]
    with torch.inference_mode():
        from transformers import DynamicCache

        cache_plain, cache_merged = DynamicCache(), DynamicCache()
        plain = run_layers(tiny_lm, unmerged, 0, 1, tokens.pos, CAUSAL, cache_plain)
        bias = {0: merged.log_size()}
        folded = run_layers(tiny_lm, merged.hidden, 0, 1, merged.pos, CAUSAL, cache_merged, bias)
        unbiased = run_layers(tiny_lm, merged.hidden, 0, 1, merged.pos, CAUSAL, None)
        assert torch.allclose(plain[0, -1], folded[0, -1], atol=1e-5)
        assert not torch.allclose(plain[0, -1], unbiased[0, -1], atol=1e-4)  # without the bias: x counts once
        step_plain = run_layers(tiny_lm, c, 0, 1, positions(3, 1, "cpu"), None, cache_plain)
        step_merged = run_layers(tiny_lm, c, 0, 1, positions(3, 1, "cpu"), None, cache_merged, bias)
    assert torch.allclose(step_plain, step_merged, atol=1e-5)


def test_zero_key_bias_changes_nothing(tiny_lm):
    h = torch.randn(1, 5, tiny_lm.model.config.hidden_size)
    with torch.inference_mode():
        plain = run_layers(tiny_lm, h, 0, 2, positions(0, 5, "cpu"), CAUSAL)
        biased = run_layers(tiny_lm, h, 0, 2, positions(0, 5, "cpu"), CAUSAL, None, {0: torch.zeros(5), 1: torch.zeros(3)})
    assert torch.allclose(plain, biased, atol=1e-5)


def test_every_layer_merging_in_the_forward(tiny_lm):
    prefix, passages, lead, question = btr_parts(tiny_lm)
    states = [lower_states(tiny_lm, prefix, p, 1) for p in passages]
    n, L = sum(map(len, passages)), tiny_lm.n_layers
    with torch.inference_mode():
        once = btr_forward(tiny_lm, prefix, states, question, split=1, lead_ids=lead)
        zero = btr_forward(tiny_lm, prefix, states, question, split=1, lead_ids=lead, merge_mode="every")
        every = btr_forward(tiny_lm, prefix, states, question, split=1, r_p=0.3, lead_ids=lead, merge_mode="every")
    assert torch.allclose(once.logits, zero.logits, atol=1e-5) and zero.removed == 0 and not zero.key_bias
    assert every.removed > 0 and set(every.key_bias) == {1, 2, 3}
    cached = [layer.keys.shape[-2] for layer in every.cache.layers]
    assert cached[0] == len(prefix) + len(lead) + len(question)
    assert cached[1] > cached[2] > cached[3] and cached[3] == every.next_pos - every.removed  # fewer every layer
    query_side = (len(prefix) + len(lead) + len(question)) * L
    passage_layers = sum(cached[layer] - len(prefix) - len(lead) - len(question) for layer in range(1, L))
    assert every.token_layers == query_side + passage_layers and every.removed_at_split == n - (cached[1] - cached[0])
    for layer, bias in every.key_bias.items():
        assert len(bias) == cached[layer] and float(bias.exp().sum()) == pytest.approx(cached[0] + n)
    out = decode_loop(tiny_lm, every.cache, every.logits, every.next_pos, 3, 0.0,
                      step=decode_step(tiny_lm, every.key_bias))
    assert len(out.ids) == 3


def test_every_layer_merging_through_answer(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    knobs = dict(split=1, bits=1, k=3, max_new_tokens=2)
    plain = method.answer("Where is the tower?", corpus, method.Params(**knobs))
    merged = method.answer("Where is the tower?", corpus, method.Params(**knobs, r_p=0.2, merge_mode="every"))
    note = next(n for n in merged.notes if n.startswith("runtime merging folded"))
    assert "proportional attention" in note and int(note.split()[3]) > 0
    assert merged.processed_tokens < plain.processed_tokens and merged.prompt_tokens < plain.prompt_tokens
    with pytest.raises(Exception, match="merge_mode"):
        method.answer("x?", corpus, method.Params(**knobs, merge_mode="sometimes"))
