import json
from pathlib import Path
import re
import os
import subprocess
import sys

import pytest

from ragdemo.units import fmt_bytes


def run(args, home, model=None, check=True):
    env = {**os.environ, "RAGDEMO_HOME": str(home), "RAGDEMO_DTYPE": "fp32", "RAGDEMO_MAX_NEW_TOKENS": "6"}
    if model:
        env["RAGDEMO_MODEL"] = str(model)
    proc = subprocess.run([sys.executable, "-m", "ragdemo", *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def test_cli_contract(tmp_path, tiny_model_dir, docs_dir):
    home = tmp_path / "home"
    out = run(["ingest", *map(str, sorted(docs_dir.iterdir())), "--collection", "demo"], home, tiny_model_dir)
    assert out.stdout.count("added:") == 2
    listing = run(["list", "--collection", "demo"], home, tiny_model_dir).stdout
    assert "eiffel.txt" in listing and "bananas.md" in listing
    listed = json.loads(run(["list", "--collection", "demo", "--json"], home, tiny_model_dir).stdout)
    assert sorted(d["name"] for d in listed["documents"]) == ["bananas.md", "eiffel.txt"]
    assert listed["shared_storage"] == {}  # BTR skips the tiny model at its default split and no adapter is trained
    assert all(f"{d['n_chunks']} chunks  {fmt_bytes(d['size'])}  [" in listing for d in listed["documents"])
    asked = run(["ask", "When was the tower completed?", "--collection", "demo", "--methods",
                 "closed_book,full_context,rag", "--json"], home, tiny_model_dir)
    results = json.loads(asked.stdout)  # stdout is the JSON array and nothing else
    assert [r["method"] for r in results] == ["closed_book", "full_context", "rag"]
    assert all(r["prompt_tokens"] > 0 and r["total_s"] > 0 for r in results)
    text = run(["ask", "When was the tower completed?", "--collection", "demo", "--methods", "rag"], home,
               tiny_model_dir).stdout
    assert "| storage read 0 B" in text  # what this answer read, in the same units as every other screen
    assert re.search(r"TTFT \d+ ms|TTFT \d+\.\d\d s", text), text  # times as the cards show them
    prepared = run(["prepare", "--methods", "rag", "--collection", "demo"], home, tiny_model_dir)
    assert "nothing to prepare" in prepared.stdout
    deleted = run(["delete", "eiffel.txt", "--collection", "demo"], home, tiny_model_dir)
    assert "deleted eiffel.txt" in deleted.stdout
    assert "eiffel.txt" not in run(["list", "--collection", "demo"], home, tiny_model_dir).stdout


@pytest.mark.parametrize("args,message", [
    (["ask", "   "], "question is empty"),
    (["ask", "x" * 20000], "limit"),
    (["ask", "hi", "--methods", "nope"], "unknown method"),
    (["ask", "hi", "--collection", "no-such"], "no collection"),
    (["delete", "ghost.txt"], "no collection"),
    (["ingest", "/nonexistent/file.txt"], "no such file"),
    (["frobnicate"], "invalid choice"),
    # ingest needs the model's tokenizer (ask says a missing collection first, before any model loads)
    (["ingest", str(Path(__file__).resolve().parents[1] / "README.md"), "--quantize", "4bit"], "CUDA"),
    (["ingest", str(Path(__file__).resolve().parents[1] / "README.md"), "--model", "no-such-org/no-such-model-xyz"],
     "could not load model"),
    (["list", "--collection", "../etc"], "collection name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, args, message):
    proc = run(args, tmp_path / "home", tiny_model_dir, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_knobs_lists_each_knob_with_what_it_accepts(tmp_path, capsys, monkeypatch):
    """The same declarations the check reads and the Methods tab shows (`--set` needs them on the command line)."""
    from ragdemo.cli import main

    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))
    assert main(["knobs", "--methods", "btr,rag"]) == 0
    out = capsys.readouterr().out
    assert "## btr  (--set btr.KNOB=VALUE)" in out and "## rag" in out and "## lloco" not in out
    assert "| Bits per value | `bits` | `1` | one of 1, 2, 4, 8, 16 |" in out
    assert "| Chunks retrieved | `k` | `5` | a whole number from 1 to 500 |" in out
