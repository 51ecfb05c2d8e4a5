import re

import pytest


@pytest.mark.slow
def test_speed_bench_quick_measures_every_method_honestly(tiny_bench, capsys, monkeypatch):
    """The quick bench on the tiny model: prefill shares of the peak within (0, 100], every method row present
    with non-negative components that account for its TTFT, the LoRA rows really use an adapter, and the
    temporary store is gone afterwards (the user's store gains nothing)."""
    from ragdemo.bench import speed

    monkeypatch.setattr(speed, "bench_load", lambda settings: print("model load: skipped in the test"))
    folders = []
    scratch = speed._scratch_workbench
    monkeypatch.setattr(speed, "_scratch_workbench", lambda bench: folders.append(scratch(bench)) or folders[-1])
    before = [r["name"] for r in tiny_bench.store.rows("SELECT name FROM collections")]
    out = speed.run_speed_bench(tiny_bench, quick=True)
    text = capsys.readouterr().out

    assert len(out["prefill"]) == 2 and all(r["seconds"] > 0 and r["peak"] > 0 for r in out["prefill"])
    prefill_lines = [line for line in text.splitlines() if re.match(r"prefill +\w+ +\d+ tokens", line)]
    shares = [int(m) for m in re.findall(r"(\d+)% of this run's matmul peak", "\n".join(prefill_lines))]
    assert len(prefill_lines) == 2 and len(shares) + "".join(prefill_lines).count("no share shown") == 2
    assert all(0 < share <= 100 for share in shares)
    shaped = [line for line in text.splitlines() if "the model's own projections" in line]
    assert len(shaped) == 2 and all(r["layer_peak"] > 0 for r in out["prefill"])  # the model-shaped probe too
    assert all(r["peak"] >= r["layer_peak"] for r in out["prefill"])  # the peak is the best of every probe
    assert all(int(m) <= 100 for m in re.findall(r"(\d+)% of the peak", "\n".join(shaped)))
    assert sum("matmul peak" in line and "the best of the square" in line for line in text.splitlines()) == 2

    rows = out["methods"]
    assert [r.method for r in rows] == ["rag", "btr", "btr", "btr", "btr", "lloco", "lloco"]
    assert [r.lora for r in rows] == [False, False, True, False, True, False, True]
    for row in rows:
        assert len(row.results) == 2  # the quick run asks 2 questions, after an untimed warm-up answer
        for result, model_s, first_s in row.results:
            assert model_s > 0 and first_s >= 0 and result.retrieve_s > 0 and result.load_s >= 0
            parts = result.retrieve_s + result.load_s + model_s + first_s
            assert parts <= result.ttft_s + 1e-3  # the overhead outside the model is never negative
            assert model_s < result.ttft_s
        assert row.label in text
    for row in rows[1:]:
        assert row.mean("processed_tokens") < rows[0].mean("processed_tokens")  # the reuse methods compute less
    assert "trained here for timing only" in text

    assert folders and not __import__("pathlib").Path(folders[0][0].name).exists()
    assert [r["name"] for r in tiny_bench.store.rows("SELECT name FROM collections")] == before


def test_attention_paths_times_both_paths_and_they_agree(tiny_lm, capsys):
    """The mask-vs-kernel probe prints one line per length, and the two attention paths give the same states
    (the engine may take either; resolve_mask picks the kernel where it applies)."""
    from ragdemo.bench.speed import attention_paths

    rows = attention_paths(tiny_lm, "float32", [16, 64], layers=2, rounds=1)
    text = capsys.readouterr().out
    assert [r["tokens"] for r in rows] == [16, 64]
    assert [line.split(" tokens")[0].split()[-1] for line in text.splitlines() if line.startswith("attention")] == ["16", "64"]
    for row in rows:
        assert row["mask_s"] > 0 and row["kernel_s"] > 0
        assert row["max_abs_diff"] < 1e-4


def test_attention_paths_compare_the_blocked_kernel_with_sdpa_and_restore_it(tiny_model_dir, tiny_lm, capsys):
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from ragdemo.bench.speed import attention_paths
    from ragdemo.models.attention import MIN_ROWS, NAME, register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    model.set_attn_implementation(register())
    lm = dataclasses.replace(tiny_lm, model=model, dtype=torch.bfloat16)
    rows = attention_paths(lm, "bfloat16", [MIN_ROWS], layers=2, rounds=1)
    assert "SDPA's kernel" in capsys.readouterr().out
    assert rows[0]["sdpa_s"] > 0 and rows[0]["max_abs_diff"] == 0.0  # explicit mask and no mask: the same sums
    assert 0 < rows[0]["sdpa_rel_diff"] < 0.02
    assert model.config._attn_implementation == NAME


def test_every_configuration_answers_first_in_turn():
    """bench-speed rotates the order per question, so no configuration always pays for a cold first retrieval."""
    from ragdemo.bench.speed import rotated

    rows = ["rag", "btr", "lloco"]
    orders = [rotated(rows, i) for i in range(6)]
    assert [order[0] for order in orders] == ["rag", "btr", "lloco", "rag", "btr", "lloco"]
    assert all(sorted(order) == sorted(rows) for order in orders)


def test_no_share_above_100_percent_is_printed():
    from ragdemo.bench.speed import share_of_peak, share_of_time

    assert share_of_time(0.25) == "25% of this prefill's time"
    assert "%" not in share_of_time(1.2) and "no share" in share_of_time(1.2)
    assert share_of_peak(50.0, 100.0).strip().startswith("50%")
    assert "%" not in share_of_peak(120.0, 100.0)


def test_lloco_ceiling_is_the_timed_question_floor_and_btr_the_token_layers():
    """LLoCO's ceiling is RAG's prefill over the question's prefill alone (timed), not its token count; BTR's is
    RAG's token-layers over its own."""
    from types import SimpleNamespace

    from ragdemo.bench.speed import Row, ceiling

    def row(method, prefill_s, processed):
        return Row(method, method, {}, results=[(SimpleNamespace(processed_tokens=processed), prefill_s, 0.0)])

    rag, btr, lloco = row("rag", 0.150, 350), row("btr", 0.090, 175), row("lloco", 0.045, 23)
    assert ceiling(lloco, rag, question_floor_s=0.037) == pytest.approx(0.150 / 0.037)
    assert ceiling(btr, rag, question_floor_s=0.037) == pytest.approx(2.0)
    assert ceiling(rag, rag, question_floor_s=0.037) == pytest.approx(1.0)
