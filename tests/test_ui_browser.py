"""End to end in a real headless Chromium (Debian's /usr/bin/chromium + chromedriver): start `python app.py` on a
free port, upload a document through the file input, compare three methods, check every card, save a screenshot.

It uses the real embedded default model (SmolLM2-135M-Instruct, about a second per method on a laptop CPU): a
random tiny model may stop at once and give an empty answer, and the test must fail when an answer is missing.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

from tests.ui_browser import CHROMEDRIVER, CHROMIUM, DOCUMENT, METHODS, chrome, running_app, screenshot_cards, upload_and_compare

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian chromium and chromedriver are needed (tests/run.sh installs them)")
    driver = chrome(tmp_path / "chrome-profile")
    yield driver
    driver.quit()


HOSTILE = "Visitors' notes: <img src=x onerror=\"document.title='pwned'\"> <script>document.title='pwned'</script> ${7*7}\n"


def test_upload_and_compare_three_methods_in_chromium(tmp_path, browser, default_model_dir):
    document = tmp_path / "eiffel.txt"
    document.write_text(DOCUMENT)
    hostile = tmp_path / "notes.md"  # uploaded text that looks like HTML must show as text, never run
    hostile.write_text(HOSTILE)
    screenshot = tmp_path / "ask.png"
    with running_app(tmp_path / "home", "default", tmp_path / "app.log") as url:
        try:
            cards = upload_and_compare(browser, url, [document, hostile])
            screenshot_cards(browser, screenshot)
            page_title = browser.title
            sees_text = browser.find_element(By.ID, "model-sees").text
            injected = browser.find_elements(By.CSS_SELECTOR, "#model-sees img, #sources img, #model-sees script, #sources script")
        except Exception:
            browser.save_screenshot(str(tmp_path / "failure.png"))
            print((tmp_path / "app.log").read_text()[-4000:])
            raise

    # full context, the slow one, runs last so the fast methods' answers show first
    assert [c.method for c in cards] == [m for m in METHODS if m != "full_context"] + ["full_context"]
    for card in cards:
        assert not card.error, f"{card.method}: {card.error}"
        assert card.answer, f"{card.method} shows no answer"
        assert card.metrics["prompt_tokens"] > 0 and card.metrics["new_tokens"] > 0, card
        assert card.metrics["ttft_s"] > 0 and card.metrics["total_s"] >= card.metrics["ttft_s"], card
    by_method = {c.method: c for c in cards}
    # the document reached the prompt: the context methods read more tokens than the question alone
    assert by_method["full_context"].metrics["prompt_tokens"] > by_method["closed_book"].metrics["prompt_tokens"] + 50
    assert by_method["rag"].metrics["retrieve_s"] > 0
    assert screenshot.stat().st_size > 20_000
    assert page_title != "pwned" and not injected
    shown = sees_text.replace("\n", "")
    assert "<img src=x" in shown and "${7*7}" in shown  # full context shows the hostile text literally, unevaluated


def test_a_five_method_compare_stops_at_its_time_limit_in_chromium(tmp_path, browser, default_model_dir):
    """RAGDEMO_MAX_COMPARE_S=10 with answers long enough to need far more: the whole Compare, five methods, ends
    within about 10 s plus one prefill (the method decoding at the limit is cut there, the later ones do not start),
    measured from the click to the last finished card."""
    from tests.ui_browser import timed_compare

    limit, methods = 10.0, ["closed_book", "rag", "retro", "jrt", "full_context"]
    document = tmp_path / "eiffel.txt"
    document.write_text(DOCUMENT)
    with running_app(tmp_path / "home", "default", tmp_path / "app.log", max_new_tokens=400,
                     extra_env={"RAGDEMO_MAX_COMPARE_S": str(limit)}) as url:
        try:
            upload_and_compare(browser, url, [document], methods=["closed_book"])  # model, index and page warm
            cards, elapsed = timed_compare(browser, methods)  # from the click to the last finished card
            screenshot_cards(browser, tmp_path / "limit.png")
        except Exception:
            browser.save_screenshot(str(tmp_path / "failure.png"))
            print((tmp_path / "app.log").read_text()[-4000:])
            raise
    answered = [c for c in cards if not c.error]
    not_run = [c for c in cards if c.error.startswith("not run")]
    prefill = max(c.metrics["ttft_s"] for c in answered)  # the longest first-token wait among the answers
    print(f"5-method Compare with a {limit:g} s limit: {elapsed:.1f} s from click to the last card; longest TTFT "
          f"{prefill:.2f} s; answered {[c.method for c in answered]}, not run {[c.method for c in not_run]}")
    assert answered and not_run and len(answered) + len(not_run) == len(methods)
    assert all("RAGDEMO_MAX_COMPARE_S" in c.error for c in not_run)
    assert sum(c.metrics["total_s"] for c in answered) <= limit + prefill + 1.0  # the app's own clock
    assert elapsed <= limit + prefill + 4.0  # and the browser's: page updates every 0.25 s, a warm-up check


@pytest.mark.slow
def test_classroom_flow_in_chromium(tmp_path, browser, default_model_dir):
    """Load the demo, compare the default methods with ✓/✗, a rejected upload then a good one with the table
    intact, delete with confirmation, start and cancel a benchmark; screenshots at 1600 and 800 px."""
    import struct

    from ragdemo.workbench import Workbench
    from tests.ui_browser import DEFAULT_METHODS, SHOTS, classroom_flow

    shots = SHOTS  # the issue asks for them under assets/screenshots/: the README shows these files
    started = time.time()
    with running_app(tmp_path / "home", "default", tmp_path / "app.log") as url:
        try:
            seen = classroom_flow(browser, url, tmp_path, shots)
        except Exception:
            browser.save_screenshot(str(tmp_path / "failure.png"))
            print((tmp_path / "app.log").read_text()[-4000:])
            raise
    assert "SmolLM2-135M" in seen["header"] and "M parameters" in seen["header"]
    assert seen["question"] == Workbench.demo_examples(1)[0][0]  # the first example question is in the box
    assert seen["default_methods"] == sorted(DEFAULT_METHODS)
    assert [c.method for c in seen["cards"]] == DEFAULT_METHODS
    for card in seen["cards"]:
        assert not card.error and card.answer, card
    assert set(seen["gold"].values()) <= {"0", "1"} and all(seen["gold"].values())  # every card shows ✓ or ✗
    assert "Amazon_rainforest.txt" in seen["table_after_reject"]  # the table survived the rejected file
    assert "Error" not in seen["table_after_reject"]
    assert "virus.exe" not in seen["status_after_good"]  # the rejected file was not sent again
    assert "Amazon_rainforest.txt" in seen["table_after_good"] and "eiffel.txt" in seen["table_after_good"]
    assert "eiffel.txt" not in seen["table_after_delete"] and "Amazon_rainforest.txt" in seen["table_after_delete"]
    assert "Cancelled" in seen["bench_status"]
    assert not seen["errors"]
    # out-of-range numbers: one sentence next to the button pressed, the box back at the value in force, and never
    # Gradio's red Error box (Gradio's own bounds used to refuse them before the handler ran)
    knob, setting = seen["bad_knob"], seen["bad_setting"]
    assert "rag.k (chunks retrieved) must be a whole number from 1 to 500 (got 0)" in knob["status"], knob
    assert "rag.max_new_tokens (max new tokens) must be a whole number from 1 to 4096 (got 99999)" in knob["status_max_new"]
    assert knob["k_after"] == "5" and knob["max_new_after"] == "0" and knob["error_boxes"] == 0, knob
    assert "max new tokens must be a whole number from 1 to 4096 (got 0)" in setting["status"], setting
    assert setting["after"] == setting["before"] == "32" and setting["error_boxes"] == 0, setting
    log = (tmp_path / "app.log").read_text()
    assert "No module named 'kernels'" not in log and "Traceback" not in log, log[-3000:]
    for name, width in (("ask_1600.png", 1600), ("ask_800.png", 800), ("library_1600.png", 1600),
                        ("sources_history_800.png", 800)):
        png = (shots / name).read_bytes()
        assert len(png) > 20_000 and (shots / name).stat().st_mtime > started
        assert struct.unpack(">I", png[16:20])[0] == width, name  # the PNG header's width: taken at that size


@pytest.mark.slow
def test_first_start_says_it_converts_the_model(tmp_path, browser, default_model_dir):
    """An empty model cache is the first start after install: the Ask header says the embedded model is being
    converted and how far it is, a Compare pressed meanwhile says it waits for the model (not a bare clock), then
    answers; the server's log says it too."""
    from tests.ui_browser import open_tab, pick_methods, text_of, wait_until

    shot = tmp_path / "first_start.png"
    with running_app(tmp_path / "home", "default", tmp_path / "app.log", cache=tmp_path / "empty-cache") as url:
        browser.get(url)
        open_tab(browser, "Ask")
        header = wait_until(lambda: "converting the embedded model" in text_of(browser, "ask-header")
                            and text_of(browser, "ask-header"), 120, "the header to say the model is converting")
        browser.save_screenshot(str(shot))
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("Why is the sky blue?")
        pick_methods(browser, ["closed_book"])  # it needs no documents: this store is empty
        browser.find_element(By.ID, "compare-button").click()
        waiting = wait_until(lambda: "Waiting for the model" in text_of(browser, "ask-status")
                             and text_of(browser, "ask-status"), 60, "Compare to say it waits for the model")
        ready = wait_until(lambda: "M parameters" in text_of(browser, "ask-header") and text_of(browser, "ask-header"),
                           900, "the header to name the loaded model")
        cards = wait_until(lambda: read_cards_done(browser), 600, "the cards after the wait")
    assert "%" in header and "first start" in header, header
    assert "converting the embedded model" in waiting, waiting
    assert "SmolLM2-135M" in ready
    assert any(c.method == "closed_book" and c.answer for c in cards), cards
    assert (tmp_path / "empty-cache" / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    log = (tmp_path / "app.log").read_text()
    assert "start-up: first start: converting the embedded model" in log, log[-2000:]


def read_cards_done(driver):
    from tests.ui_browser import read_cards

    cards = read_cards(driver)
    return cards if cards and all(c.drawn for c in cards) else []


@pytest.mark.slow
def test_two_users_one_benchmarks_the_other_compares(tmp_path, browser, default_model_dir):
    """User A runs a benchmark; user B's Compare finishes while A's benchmark is still running (long jobs take
    the model lock per question, not for the whole run)."""
    from tests.ui_browser import compare_current, open_tab, text_of, upload_files, wait_until

    other = chrome(tmp_path / "profile-b")
    document = tmp_path / "eiffel.txt"
    document.write_text(DOCUMENT)
    try:
        with running_app(tmp_path / "home", "default", tmp_path / "app.log") as url:
            # B's document is in before A starts: an upload is a long job too, and long jobs queue one at a time
            other.get(url)
            open_tab(other, "Library")
            upload_files(other, [document], prepare=False)
            wait_until(lambda: "eiffel.txt" in text_of(other, "documents-table"), 600, "B's upload")
            browser.get(url)
            open_tab(browser, "Benchmark")
            box = browser.find_element(By.CSS_SELECTOR, "#bench-n input")
            box.clear()
            box.send_keys("20")
            browser.find_element(By.ID, "bench-run").click()
            time.sleep(8)  # A's benchmark is under way
            open_tab(other, "Ask")
            other.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("When was the Eiffel Tower completed?")
            started = time.time()
            cards = compare_current(other, ["closed_book", "rag"], timeout=600)
            waited = time.time() - started
            bench_status = text_of(browser, "bench-status")
            browser.find_element(By.ID, "bench-cancel").click()
            wait_until(lambda: "Cancelled" in text_of(browser, "bench-status"), 900, "A's benchmark to stop")
    finally:
        other.quit()
    assert all(c.answer for c in cards)
    assert "Cancelled" not in bench_status and "reference" not in bench_status  # A's run was still going
    # B waits for at most one of A's answers per method (seconds), never for A's whole run (minutes); the bound
    # also covers B's first-use warm-up on a busy 2-core machine
    assert waited < 120, f"B's Compare waited {waited:.0f} s behind A's benchmark"
    print(f"B's Compare took {waited:.0f} s during A's benchmark")
