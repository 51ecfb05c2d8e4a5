"""Issue 16 outside the UI: the CLI's demo and collection commands, read-only commands that never create, plain
progress lines off a terminal, one answer length everywhere, a closed-book prompt that is true, RETRO's stride."""
from __future__ import annotations

import io

from ragdemo import cli
from ragdemo.config import DEFAULT_MAX_NEW_TOKENS, Settings
from ragdemo.engine.prompt import build_prompt
from ragdemo.methods.base import Params
from ragdemo.methods.retro import RetroParams


def test_read_only_commands_never_create_a_collection(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))
    assert cli.main(["list", "--collection", "nosuch"]) == 2
    assert "no collection named 'nosuch'" in capsys.readouterr().err
    assert cli.main(["collections"]) == 0
    assert "nosuch" not in capsys.readouterr().out


def test_collections_command_creates_renames_and_deletes_only_with_yes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))
    assert cli.main(["collections", "--create", "notes"]) == 0
    assert cli.main(["collections", "--rename", "notes", "physics"]) == 0
    out = capsys.readouterr().out
    assert "renamed 'notes' to 'physics'" in out and "physics  0 documents" in out
    assert cli.main(["collections", "--delete", "physics"]) == 2  # refused without --yes
    assert "--yes" in capsys.readouterr().err
    assert cli.main(["collections", "--delete", "physics", "--yes"]) == 0
    assert "physics  0" not in capsys.readouterr().out.split("deleted collection 'physics'")[1]


def test_progress_is_one_plain_line_per_stage_off_a_terminal():
    stream = io.StringIO()
    context, update = cli._progress_bar("ingest", stream)
    with context:
        for fraction, message in ((0, "ingesting hubs.txt"), (0.3, "ingesting hubs.txt"), (0.5, "btr: chunk 1/9"),
                                  (0.6, "btr: chunk 2/9"), (0.9, "lloco: chunk 1/9")):
            update(fraction, message)
    assert stream.getvalue().splitlines() == ["ingest: ingesting hubs.txt", "ingest: btr: chunk 1/9",
                                              "ingest: lloco: chunk 1/9"]
    assert "\r" not in stream.getvalue() and ", " not in stream.getvalue()


def test_one_answer_length_for_ask_cli_and_bench(monkeypatch):
    from ragdemo.bench import runner

    monkeypatch.delenv("RAGDEMO_MAX_NEW_TOKENS", raising=False)
    assert Settings().max_new_tokens == Params().max_new_tokens == runner.DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_NEW_TOKENS


def test_retro_default_stride_re_retrieves_within_a_default_answer():
    stride = RetroParams().stride
    assert 4 <= stride <= 32 and stride < DEFAULT_MAX_NEW_TOKENS  # In-Context RALM's range; happens in the app


def test_closed_book_prompt_does_not_mention_a_context(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    closed = tokenizer.decode(build_prompt(tokenizer, "Why?", []).ids)
    with_context = tokenizer.decode(build_prompt(tokenizer, "Why?", [{"doc": "a", "text": "Because."}]).ids)
    assert "context" not in closed.lower()
    assert "using the context" in with_context


def test_retro_says_when_no_re_retrieval_happened(tiny_bench, docs_dir):
    tiny_bench.ingest([("eiffel.txt", docs_dir / "eiffel.txt")], "demo", prepare=False)
    (result,) = tiny_bench.ask("Who built the tower?", ["retro"], "demo", {"retro": {"max_new_tokens": 4}})
    assert result.new_tokens <= 4
    assert any(n.startswith("no re-retrieval: the answer ended after") for n in result.notes), result.notes
