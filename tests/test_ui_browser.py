"""End to end in a real headless Chromium (Debian's /usr/bin/chromium + chromedriver): start `python app.py` on a
free port, upload a document through the file input, compare three methods, check every card, save a screenshot.

It uses the real embedded default model (SmolLM2-135M-Instruct, about a second per method on a laptop CPU): a
random tiny model may stop at once and give an empty answer, and the test must fail when an answer is missing.
"""
from __future__ import annotations

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

    assert [c.method for c in cards] == METHODS
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
