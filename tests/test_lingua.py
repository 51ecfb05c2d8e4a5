"""LLMLingua-style compression: surprisal as the model computes it, exactly the budgeted tokens kept in order,
question-aware scoring changes the choice and is paid for, one storage account."""
import pytest
import torch
import torch.nn.functional as F

from ragdemo.engine.prefix import compute_prefix, instruction_prefix_ids
from ragdemo.engine.surprisal import surprisal
from ragdemo.methods import get_method
from ragdemo.methods.base import StorageAccount, params_from
from ragdemo.methods.chunk_artifacts import token_budget
from tests.test_cacheblend import ingest

QUESTION = "Who designed the tower?"
TOKENS = {"unit": "token", "spread": 0.0}  # LLMLingua's plain selection: single tokens, one pooled budget


def plan(corpus, **knobs):
    method = get_method("lingua")
    return method._plan(QUESTION, corpus, params_from(method.Params, knobs))


def test_batched_surprisal_equals_the_plain_forward(tiny_lm):
    tok = tiny_lm.tokenizer
    prefix_ids = instruction_prefix_ids(tok)
    sequences = [tok(t, add_special_tokens=False)["input_ids"] for t in
                 ("The Eiffel Tower is in Paris.", "Bananas are yellow fruits that grow in tropical regions.", "Hi")]
    got = surprisal(tiny_lm, compute_prefix(tiny_lm, prefix_ids), sequences)
    for ids, nats in zip(sequences, got):
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=torch.tensor([prefix_ids + ids])).logits[0]
        logp = F.log_softmax(logits[len(prefix_ids) - 1:-1].float(), dim=-1)
        want = -logp.gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(nats, want, atol=1e-4, rtol=1e-4)  # padding in the batch changed nothing


@pytest.mark.parametrize("ratio", [0.33, 0.5, 0.7])
def test_keeps_exactly_the_budgeted_tokens_in_order(tiny_bench, docs_dir, ratio):
    corpus = ingest(tiny_bench, docs_dir)
    p = plan(corpus, ratio=ratio, **TOKENS)
    shown = [s for s in p.shown.segments if s.kind == "passage"]
    kept = [s for s in p.kept.segments if s.kind == "passage"]
    n = sum(len(s.ids) for s in shown)
    assert sum(len(s.ids) for s in kept) == token_budget(ratio, n) == round(sum(sum(s.keep) for s in shown))
    for full, short in zip(shown, kept):  # the kept ids are the flagged ones, in their original order
        assert short.ids == [t for t, k in zip(full.ids, full.keep) if k == 1]
    # the model reads prefix, kept tokens, question: ids, not re-tokenised text
    assert p.kept.ids == p.kept.segments[0].ids + [t for s in kept for t in s.ids] + p.kept.segments[-1].ids
    # and what was kept is what scored highest
    lingua = get_method("lingua")
    hits = sorted(corpus.retrieve(QUESTION, 5)[0], key=lambda h: (h["doc_id"], h["ord"]))
    from ragdemo.methods.base import Result
    from safetensors.numpy import load
    scores = torch.cat([torch.from_numpy(load(b)["surprisal"]).float()
                        for b in lingua.fetch(corpus, lingua.Params(), hits, Result("lingua"))])
    flags = torch.tensor([k for s in shown for k in s.keep]).bool()
    assert scores[flags].min() >= scores[~flags].max()


def test_ratio_1_reads_what_rag_reads_over_the_same_chunks(tiny_bench, docs_dir):
    from ragdemo.engine.prompt import build_prompt

    corpus = ingest(tiny_bench, docs_dir)
    hits = sorted(corpus.retrieve(QUESTION, 5)[0], key=lambda h: (h["doc_id"], h["ord"]))
    assert plan(corpus, ratio=1.0).kept.ids == build_prompt(corpus.lm.tokenizer, QUESTION, hits).ids


def test_question_aware_changes_the_selection_and_is_paid_for(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    plain, aware = plan(corpus, **TOKENS), plan(corpus, question_aware=True, **TOKENS)
    flags = lambda p: [k for s in p.shown.segments if s.kind == "passage" for k in s.keep]  # noqa: E731
    assert len(flags(plain)) == len(flags(aware)) and sum(flags(plain)) == sum(flags(aware))
    assert flags(plain) != flags(aware)
    n = len(flags(plain))
    assert plain.scoring_tokens == 0 and aware.scoring_tokens > n  # question prefix + every passage token
    one, two = tiny_bench.ask(QUESTION, ["lingua"])[0], tiny_bench.ask(QUESTION, ["lingua"], knobs={"lingua": {"question_aware": True}})[0]
    assert one.processed_tokens + one.cached_tokens == one.prompt_tokens and one.overhead_tokens == 0
    # the scoring pass is paid for (in TTFT, as overhead) but is not prompt: the model does not attend to it
    assert two.processed_tokens + two.cached_tokens == two.prompt_tokens == one.prompt_tokens
    assert two.overhead_tokens == aware.scoring_tokens
    assert any("question-aware scoring ran" in note for note in two.notes)


def test_answer_fields_and_storage_account(tiny_bench, docs_dir):
    corpus = ingest(tiny_bench, docs_dir)
    lingua = get_method("lingua")
    first, = tiny_bench.ask(QUESTION, ["lingua"])
    assert not first.error and first.prepare_s > 0
    lingua.prepare(corpus, lingua.Params())
    result, = tiny_bench.ask(QUESTION, ["lingua"])
    assert result.prepare_s == 0
    # the shared instruction prefix is read from the LM's prefix cache, as for every method
    assert result.cached_tokens == result.segments[0]["n_tokens"] > 0 and result.segments[0]["mark"] == "cached"
    assert result.processed_tokens == result.prompt_tokens - result.cached_tokens
    passages = [s for s in result.segments if s["kind"] == "passage"]
    n = sum(s["n_tokens"] for s in passages)
    assert all(s["mark"] == "pruned" and len(s["keep"]) == len(s["tokens"]) == s["n_tokens"] for s in passages)
    assert result.prompt_tokens == result.segments[0]["n_tokens"] + token_budget(0.5, n) + result.segments[-1]["n_tokens"]
    account = lingua.storage(corpus, lingua.Params())
    assert isinstance(account, StorageAccount) and account.tokens == corpus.n_tokens() and account.shared == {}
    rows = tiny_bench.store.rows("SELECT nbytes FROM artifacts WHERE method = 'lingua'")
    assert account.chunk_bytes == sum(r["nbytes"] for r in rows)
    chunk_tokens = sum(len(corpus.lm.tokenizer(c["text"].strip() + "\n\n", add_special_tokens=False)["input_ids"])
                       for c in corpus.chunks())
    assert 2 * chunk_tokens <= account.chunk_bytes < 2 * chunk_tokens + 200 * len(rows)  # fp16 per token + header
    assert result.bytes_per_token == pytest.approx(account.bytes_per_token, abs=0.01)
    assert result.storage_bytes > 0 and result.chunk_bytes_per_token == pytest.approx(result.storage_bytes / n, abs=0.01)
    tiny_bench.delete("eiffel.txt")
    tiny_bench.delete("bananas.md")
    assert lingua.storage(corpus, lingua.Params()).chunk_bytes == 0


def test_nll_reads_the_compressed_prompt(tiny_bench, docs_dir):
    from ragdemo.engine.scoring import nll_of_answer

    corpus = ingest(tiny_bench, docs_dir)
    lingua = get_method("lingua")
    params = params_from(lingua.Params, {"ratio": 0.33})
    assert lingua.nll(QUESTION, "Gustave Eiffel", corpus, params) == pytest.approx(
        nll_of_answer(corpus.lm, plan(corpus, ratio=0.33).kept.ids, "Gustave Eiffel"), abs=1e-5)


class _Pieces:
    """A tokenizer stand-in: ids are indices into these BPE pieces ('Ġ' marks a leading space)."""
    pieces = ["The", "ĠEif", "fel", "ĠTower", ",", "Ġbuilt", "Ġin", "Ġ18", "89", ".", "Ġit", "Ġwas", "Ġco", "lo", "ssal"]

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


def test_word_starts_keep_subword_runs_together():
    from ragdemo.methods.lingua import word_starts

    starts = word_starts(_Pieces(), list(range(len(_Pieces.pieces))))
    words, current = [], []
    for piece, start in zip(_Pieces.pieces, starts):
        if start and current:
            words.append("".join(current))
            current = []
        current.append(piece)
    words.append("".join(current))
    assert words == ["The", "ĠEiffel", "ĠTower", ",", "Ġbuilt", "Ġin", "Ġ1889", ".", "Ġit", "Ġwas", "Ġcolossal"]

    class Marks(_Pieces):  # 'Ġ' and 'Ċ' are letters to Python: whitespace marks must still split words
        pieces = ["Tower", "ĊĊ", "The", "ĠĠ", "x", "▁y", "z"]

    assert word_starts(Marks(), list(range(7))) == [True, True, True, True, True, True, False]


@pytest.mark.parametrize("count", range(0, 16))
def test_word_unit_keeps_whole_words_and_exactly_the_budget(count):
    from ragdemo.methods.lingua import keep_flags, word_starts

    ids = list(range(len(_Pieces.pieces)))
    starts = word_starts(_Pieces(), ids)
    scores = torch.tensor([1.0, 9.0, 0.1, 3.0, 0.5, 2.0, 0.2, 8.0, 0.3, 0.4, 0.6, 0.7, 5.0, 0.1, 0.1])
    # two passages: the word boundary at the split is forced
    flags = keep_flags([scores[:6], scores[6:]], count, [starts[:6], [True] + starts[7:]])
    flat = flags[0] + flags[1]
    assert sum(flat) == count  # exact budget
    spans, begin = [], 0
    for i in range(1, len(flat) + 1):
        if i == len(flat) or i == 6 or starts[i]:
            spans.append(flat[begin:i])
            begin = i
    cut = [s for s in spans if 0 < sum(s) < len(s)]
    assert len(cut) <= 1  # at most one word is cut, and only to fill the budget exactly
    assert all(s[:sum(s)] == [1] * sum(s) for s in cut)  # a cut word keeps its first pieces
    if count == 3:  # "ĠEif fel" (max 9) fits; "Ġ18 89" (8) and "Ġco lo ssal" (5) do not fit the one left; "ĠTower" does
        assert flat == [0, 1, 1, 1] + [0] * 11
    # only when no remaining word fits is one cut, keeping its first pieces
    assert keep_flags([torch.tensor([9.0, 0.1, 0.2])], 2, [[True, False, False]]) == [[1, 1, 0]]


@pytest.mark.parametrize("ratio", [0.33, 0.5, 0.7])
def test_word_unit_plan_keeps_the_budget_in_order_and_never_cuts_more_than_one_word(tiny_bench, docs_dir, ratio):
    from ragdemo.methods.lingua import word_starts

    corpus = ingest(tiny_bench, docs_dir)
    p, tokens = plan(corpus, ratio=ratio, unit="word", spread=0.0), plan(corpus, ratio=ratio, **TOKENS)
    shown = [s for s in p.shown.segments if s.kind == "passage"]
    kept = [s for s in p.kept.segments if s.kind == "passage"]
    n = sum(len(s.ids) for s in shown)
    assert sum(len(s.ids) for s in kept) == token_budget(ratio, n)
    cut = 0
    for full, short in zip(shown, kept):
        assert short.ids == [t for t, k in zip(full.ids, full.keep) if k == 1]
        starts = word_starts(corpus.lm.tokenizer, full.ids) + [True]
        begin = 0
        for i in range(1, len(full.ids) + 1):
            if starts[i]:
                flags = full.keep[begin:i]
                cut += 0 < sum(flags) < len(flags)
                begin = i
    assert cut <= 1
    assert [s.keep for s in shown] != [s.keep for s in tokens.shown.segments if s.kind == "passage"]


def test_unknown_unit_is_a_one_line_error(tiny_bench, docs_dir):
    from ragdemo.errors import UserError

    corpus = ingest(tiny_bench, docs_dir)
    lingua = get_method("lingua")
    with pytest.raises(UserError):
        lingua.answer(QUESTION, corpus, params_from(lingua.Params, {"unit": "sentence"}))


def test_rank_budgets_follow_the_retrieval_rank_and_sum_to_the_budget():
    import random

    from ragdemo.methods.lingua import rank_budgets

    # ratio 0.5, spread 0.5, five equal chunks: the best kept whole, the worst dropped (scores in prompt order)
    assert rank_budgets([64] * 5, [0.3, 0.9, 0.5, 0.1, 0.7], 160, 0.5) == [16, 64, 32, 0, 48]
    assert rank_budgets([64] * 5, [0.3, 0.9, 0.5, 0.1, 0.7], 160, 0.0) == [32] * 5  # no spread: the mean ratio
    assert rank_budgets([10], [0.2], 7, 0.5) == [7]
    rng = random.Random(0)
    for _ in range(200):  # clipping at 0 or 1 never breaks the exact total or the room in each passage
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 7))]
        scores = [rng.random() for _ in lengths]
        count = rng.randint(0, sum(lengths))
        budgets = rank_budgets(lengths, scores, count, rng.choice([0.1, 0.3, 0.5, 1.0]))
        assert sum(budgets) == count and all(0 <= b <= n for b, n in zip(budgets, lengths))


@pytest.mark.parametrize("unit", ["token", "word"])
def test_spread_gives_each_passage_its_rank_budget(tiny_bench, docs_dir, unit):
    from ragdemo.methods.lingua import rank_budgets

    corpus = ingest(tiny_bench, docs_dir)
    p = plan(corpus, ratio=0.5, spread=0.5, unit=unit)
    shown = [s for s in p.shown.segments if s.kind == "passage"]
    kept = [s for s in p.kept.segments if s.kind == "passage"]
    lengths = [len(s.ids) for s in shown]
    want = rank_budgets(lengths, [s.source["score"] for s in shown], token_budget(0.5, sum(lengths)), 0.5)
    assert [len(s.ids) for s in kept] == want != [round(0.5 * n) for n in lengths]
    for full, short in zip(shown, kept):
        assert short.ids == [t for t, k in zip(full.ids, full.keep) if k == 1]
    assert any("by retrieval rank" in n for n in p.result.notes)
