"""Drive the real app in Debian's headless Chromium: start it, upload a document, compare methods, screenshot.

Used by tests/test_ui_browser.py, and as a script for the README screenshot:
    python -m tests.ui_browser --screenshot assets/screenshots/ask.png
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]
DOCUMENT = """The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was completed
in 1889 as the entrance arch to the World's Fair, and it is 330 metres tall. Gustave Eiffel's engineering company
designed and built it.

Bananas are yellow fruits that grow in tropical regions. They are rich in potassium and are eaten all over the world,
often for breakfast. A banana plant is a giant herb, not a tree.

The Moon is Earth's only natural satellite. Its surface is covered in craters and dark plains of old lava. The first
people to walk on it arrived with Apollo 11 in July 1969.

Honey bees live in colonies of tens of thousands of workers with a single queen. Workers collect nectar and pollen and
store honey in wax combs. A worker bee lives for about six weeks in summer.

The Danube is the second-longest river in Europe. It flows from the Black Forest in Germany to the Black Sea and
passes through ten countries, among them Austria, Hungary and Romania.

Sourdough bread is leavened by wild yeast and lactic acid bacteria kept in a starter. The bacteria give the bread its
sour taste, and the long fermentation makes the crumb open and chewy.

The violin has four strings tuned in perfect fifths and is played with a bow strung with horsehair. Antonio Stradivari
made his most famous violins in Cremona in the early eighteenth century.

Glaciers form where more snow falls in winter than melts in summer. The snow is pressed into ice that slowly flows
downhill under its own weight, carving valleys shaped like the letter U.

The first practical telephone was patented by Alexander Graham Bell in 1876. Early telephones were rented in pairs and
connected directly by a private wire, before switchboards made it possible to call anyone.

Penguins are flightless birds of the southern hemisphere. Their wings have become flippers, and the emperor penguin
can dive deeper than five hundred metres while hunting fish and squid.
"""
QUESTION = "When was the Eiffel Tower completed?"
METHODS = ["closed_book", "full_context", "rag"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(home: Path, model: str = "default", log_path: Path | None = None, max_new_tokens: int = 32,
                extra_env: dict | None = None, cache: Path | None = None):
    """`python app.py` on a free port with its own data dir (and, with `cache`, its own model cache: an empty one
    is a first start after install); yields the URL, stops the server afterwards."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "RAGDEMO_HOME": str(home),
           "RAGDEMO_MODEL": model, "RAGDEMO_MAX_NEW_TOKENS": str(max_new_tokens), "TOKENIZERS_PARALLELISM": "false",
           **({"RAGDEMO_CACHE": str(cache)} if cache else {}), **(extra_env or {})}
    log_path = log_path or home.parent / "app.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for_http(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def chrome(profile_dir: Path, width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@dataclass
class CardReading:
    method: str
    status: str
    answer: str
    error: str
    metrics: dict[str, float]

    @property
    def drawn(self) -> bool:
        """A finished card drawn whole: its error, or its answer's metrics. CI once read a finished card with an
        answer and no metrics (not reproduced here), so waiting on the status alone is not enough."""
        return self.status == "done" and bool(self.error or "prompt_tokens" in self.metrics)


def read_cards(driver) -> list[CardReading]:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return _read_cards(driver, By)
    except StaleElementReferenceException:  # the cards were redrawn while being read: read them next time
        return []


def _read_cards(driver, By) -> list[CardReading]:
    cards = []
    for card in driver.find_elements(By.CSS_SELECTOR, "#cards .rd-card"):
        answers = card.find_elements(By.CSS_SELECTOR, ".rd-answer")
        errors = card.find_elements(By.CSS_SELECTOR, ".rd-error")
        metrics = {m.get_attribute("data-metric"): float(m.get_attribute("data-value"))
                   for m in card.find_elements(By.CSS_SELECTOR, ".rd-metric")}
        cards.append(CardReading(card.get_attribute("data-method"), card.get_attribute("data-status"),
                                 answers[0].text.strip() if answers else "", errors[0].text.strip() if errors else "",
                                 metrics))
    return cards


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def click_compare(driver, timeout: float = 60, retry_s: float = 10) -> float:
    """Click Compare once the previous Compare's event has finished, wait until the new Compare draws its cards,
    and return the perf_counter() time of the first click. Gradio ignores a click while the previous event is
    still pending (its chart and history come after its cards read "done"; the button's trigger mode is "once"):
    the test waits for Gradio's "generating" marks to go, marks the cards on screen, and clicks again if no
    unmarked card replaces them (timing from the first click only makes a measured time longer, never shorter)."""
    from selenium.webdriver.common.by import By

    wait_until(lambda: not driver.execute_script("return document.querySelector('.generating') !== null;"),
               timeout, "the previous Compare to finish")
    mark = "document.querySelectorAll('#cards .rd-card').forEach(c => c.setAttribute('data-old', '1'));"
    started = "return document.querySelector('#cards .rd-card:not([data-old]), #cards .rd-notrun') !== null;"
    driver.execute_script(mark)
    first_click = time.perf_counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        driver.find_element(By.ID, "compare-button").click()
        try:
            wait_until(lambda: driver.execute_script(started), min(retry_s, max(deadline - time.time(), 0.5)),
                       "the Compare to start")
            return first_click
        except TimeoutError:
            continue
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for the Compare to start")

def upload_and_compare(driver, url: str, documents: Path | list[Path], question: str = QUESTION,
                       methods: list[str] = METHODS, timeout: float = 240) -> list[CardReading]:
    """The user flow: upload through the file input, switch to Ask, pick methods, Compare, wait for every card."""
    from selenium.webdriver.common.by import By

    documents = [documents] if isinstance(documents, Path) else list(documents)
    driver.get(url)
    wait_until(lambda: driver.find_elements(By.XPATH, "//button[@role='tab'][contains(., 'Library')]"), 60, "the tabs")
    open_tab(driver, "Library")
    upload_files(driver, documents, prepare=False)  # several files at once, as a user would pick them
    wait_until(lambda: all(d.name in driver.find_element(By.ID, "documents-table").text for d in documents), timeout,
               f"{[d.name for d in documents]} in the documents table")
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Ask')]").click()
    box = wait_until(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "#question textarea") if e.is_displayed()],
                     30, "the question box")[0]
    box.send_keys(question)
    for checkbox in driver.find_elements(By.CSS_SELECTOR, "#method-picker input[type=checkbox]"):
        wanted = checkbox.get_attribute("name") in methods
        if checkbox.is_selected() != wanted:
            driver.execute_script("arguments[0].click();", checkbox)
    picked = sorted(c.get_attribute("name") for c in driver.find_elements(By.CSS_SELECTOR, "#method-picker input[type=checkbox]")
                    if c.is_selected())
    if picked != sorted(methods):
        raise AssertionError(f"method checkboxes show {picked}, wanted {sorted(methods)}")
    click_compare(driver)

    def all_done():
        errors = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if "rror" in t.text]
        if errors:
            raise AssertionError(f"the app showed an error: {errors}")
        cards = read_cards(driver)
        return cards if len(cards) == len(methods) and all(c.drawn for c in cards) else None

    return wait_until(all_done, timeout, f"{len(methods)} finished method cards")


def screenshot_cards(driver, path: Path) -> None:
    """The Ask tab from the top down to the chart, as a user sees it after Compare."""
    from selenium.webdriver.common.by import By

    driver.set_window_size(1400, 3000)
    time.sleep(1.5)  # let the chart image load and the layout settle
    driver.execute_script("window.scrollTo(0, 0)")
    chart = driver.find_element(By.ID, "chart")
    bottom = driver.execute_script("return arguments[0].getBoundingClientRect().bottom + window.scrollY", chart)
    chrome_height = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1400, int(bottom + 10 + chrome_height))
    time.sleep(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


# ----------------------------------------------------------- classroom flow
DEFAULT_METHODS = ["closed_book", "rag", "retro", "btr", "lloco"]
SHOTS = ROOT / "assets" / "screenshots"


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = f"//button[@role='tab'][contains(., '{name}')]"
    # Gradio draws the page after it loads: right after driver.get() the tabs may not exist yet
    wait_until(lambda: driver.find_elements(By.XPATH, tab), 60, f"the {name} tab")
    # and while it lays the page out, the tab bar itself can take the click: try again until the tab gets it
    wait_until(lambda: _clicked(driver.find_element(By.XPATH, tab)), 30, f"a click on the {name} tab")
    time.sleep(0.5)


def _clicked(element) -> bool:
    from selenium.common.exceptions import ElementClickInterceptedException

    try:
        element.click()
    except ElementClickInterceptedException:
        return False
    return True


def text_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, elem_id)
    return found[0].text if found else ""


def close_toasts(driver) -> None:
    """Close every toast the way a user does, with its close button."""
    driver.execute_script("document.querySelectorAll('.toast-close').forEach(b => b.click());")
    time.sleep(0.5)


def error_toasts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if "rror" in t.text]


def error_boxes(driver) -> int:
    """Gradio's red "Error" over a component (drawn when a handler raises or an input fails Gradio's own checks)."""
    from selenium.webdriver.common.by import By

    return sum(1 for e in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Error']") if e.is_displayed())


def open_accordion(driver, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, elem_id)
    if not box.find_elements(By.CSS_SELECTOR, "input, textarea") or not any(
            e.is_displayed() for e in box.find_elements(By.CSS_SELECTOR, "input, textarea")):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.find_element(By.CSS_SELECTOR, "button, .label-wrap").click()
        time.sleep(0.5)


def type_number(driver, elem_id: str, value) -> None:
    """Type into a number box the way a user does (select all, type), then leave the box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)
    time.sleep(0.5)


def number_value(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]").get_attribute("value")


def out_of_range_knob(driver, timeout: float = 120) -> dict:
    """rag.k = 0 in the Ask tab's knobs, then Compare: a sentence next to the button, the box back at 5, no
    Error box anywhere."""
    from selenium.webdriver.common.by import By

    open_tab(driver, "Ask")
    open_accordion(driver, "knobs")
    open_accordion(driver, "knobs-rag")
    type_number(driver, "knob-rag-k", 0)
    driver.find_element(By.ID, "compare-button").click()
    status = wait_until(lambda: "rag.k" in text_of(driver, "ask-status") and text_of(driver, "ask-status"), timeout,
                        "the refusal next to Compare")
    time.sleep(1)
    seen = {"status": status, "k_after": number_value(driver, "knob-rag-k"),
            "error_boxes": error_boxes(driver)}
    type_number(driver, "knob-rag-max_new_tokens", 99999)
    close_toasts(driver)  # the first refusal's warning sits over the top-right corner, where Compare can scroll
    driver.find_element(By.ID, "compare-button").click()
    seen["status_max_new"] = wait_until(lambda: "max_new_tokens" in text_of(driver, "ask-status")
                                        and text_of(driver, "ask-status"), timeout, "the second refusal")
    time.sleep(1)
    seen["max_new_after"] = number_value(driver, "knob-rag-max_new_tokens")
    seen["error_boxes"] += error_boxes(driver)
    return seen


def out_of_range_setting(driver, timeout: float = 120) -> dict:
    """Max new tokens 0 in Settings, then Apply: "Not applied" with the reason, the box back at the value in
    force, no Error box over any control."""
    from selenium.webdriver.common.by import By

    open_tab(driver, "Settings")
    before = number_value(driver, "settings-max-new")
    type_number(driver, "settings-max-new", 0)
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Apply']").click()
    status = wait_until(lambda: "Not applied" in text_of(driver, "model-status") and text_of(driver, "model-status"),
                        timeout, "Settings to refuse 0")
    time.sleep(1)
    return {"status": status, "before": before, "after": number_value(driver, "settings-max-new"),
            "error_boxes": error_boxes(driver)}


def load_demo(driver, url: str, timeout: float = 1800) -> None:
    """One click: the demo collection is built and prepared, the first example question is in the box."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_until(lambda: driver.find_elements(By.ID, "load-demo"), 60, "the Load demo button")[0].click()
    wait_until(lambda: "Compare" in text_of(driver, "demo-status") and "demo" in text_of(driver, "demo-status"),
               timeout, "the demo collection to be ready")


def pick_methods(driver, methods: list[str]) -> None:
    from selenium.webdriver.common.by import By

    for checkbox in driver.find_elements(By.CSS_SELECTOR, "#method-picker input[type=checkbox]"):
        if checkbox.is_selected() != (checkbox.get_attribute("name") in methods):
            driver.execute_script("arguments[0].click();", checkbox)


def compare_current(driver, methods: list[str], timeout: float = 600) -> list[CardReading]:
    return timed_compare(driver, methods, timeout)[0]


def timed_compare(driver, methods: list[str], timeout: float = 600) -> tuple[list[CardReading], float]:
    """The cards of a Compare of `methods` on the current question, and seconds from its first click to the last
    finished card."""
    pick_methods(driver, methods)
    clicked = click_compare(driver)

    def all_done():
        if error_toasts(driver):
            raise AssertionError(f"the app showed an error: {error_toasts(driver)}")
        cards = read_cards(driver)
        return cards if len(cards) == len(methods) and all(c.drawn for c in cards) else None

    cards = wait_until(all_done, timeout, f"{len(methods)} finished method cards")
    return cards, time.perf_counter() - clicked


def gold_marks(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    out = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "#cards .rd-card"):
        marks = card.find_elements(By.CSS_SELECTOR, ".rd-gold")
        out[card.get_attribute("data-method")] = marks[0].get_attribute("data-correct") if marks else ""
    return out


def screenshot_page(driver, path: Path, width: int, until_id: str = "chart") -> None:
    """The page from the top down to `until_id` at `width` px, as a user sees it."""
    from selenium.webdriver.common.by import By

    driver.set_window_size(width, 3000)
    time.sleep(1.5)
    driver.execute_script("window.scrollTo(0, 0)")
    element = driver.find_element(By.ID, until_id)
    bottom = driver.execute_script("return arguments[0].getBoundingClientRect().bottom + window.scrollY", element)
    chrome_height = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(width, int(min(bottom + 10, 6000) + chrome_height))
    time.sleep(0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def screenshot_element(driver, path: Path, width: int, elem_ids: list[str]) -> None:
    """The page from the top of the first element to the bottom of the last, at `width` px (a tall window, then
    a crop of the full-page screenshot)."""
    from io import BytesIO

    from PIL import Image
    from selenium.webdriver.common.by import By

    driver.set_window_size(width, 3000)
    time.sleep(1.5)
    boxes = [driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.top + window.scrollY, "
                                   "r.bottom + window.scrollY]", driver.find_element(By.ID, e)) for e in elem_ids]
    top, bottom = min(b[0] for b in boxes) - 10, max(b[1] for b in boxes) + 10
    chrome_height = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(width, int(min(bottom, 9000) + chrome_height))
    time.sleep(0.8)
    driver.execute_script("window.scrollTo(0, 0)")
    image = Image.open(BytesIO(driver.get_screenshot_as_png()))
    scale = image.width / width  # a device pixel ratio other than 1
    path.parent.mkdir(parents=True, exist_ok=True)
    image.crop((0, int(top * scale), image.width, int(min(bottom, image.height / scale) * scale))).save(path)


def upload_files(driver, paths: list[Path], prepare: bool = False) -> None:
    from selenium.webdriver.common.by import By

    box = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#prepare-on-upload input[type=checkbox]"), 60,
                     "the prepare-on-upload checkbox")[0]
    if box.is_selected() != prepare:
        driver.execute_script("arguments[0].click();", box)
    file_input = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload-files input[type=file]"), 30,
                            "the file input")[0]
    file_input.send_keys("\n".join(str(p) for p in paths))


def pick_document(driver, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#doc-picker input")
    box.click()
    box.send_keys(name)
    time.sleep(0.5)
    options = [o for o in driver.find_elements(By.CSS_SELECTOR, "ul.options li") if name in o.text]
    if options:
        options[0].click()
    else:
        box.send_keys(Keys.ENTER)
    time.sleep(0.5)


def delete_with_confirmation(driver, name: str, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By

    pick_document(driver, name)
    driver.find_element(By.ID, "delete-document").click()
    confirm = wait_until(lambda: [b for b in driver.find_elements(By.ID, "confirm-delete") if b.is_displayed()], 30,
                         "the delete confirmation")[0]
    if name not in driver.find_element(By.ID, "documents-table").text:
        raise AssertionError(f"{name} vanished before the deletion was confirmed")
    confirm.click()
    wait_until(lambda: name not in driver.find_element(By.ID, "documents-table").text, timeout,
               f"{name} to leave the documents table")


def start_and_cancel_benchmark(driver, n: int = 3, timeout: float = 600) -> str:
    from selenium.webdriver.common.by import By

    open_tab(driver, "Benchmark")
    box = driver.find_element(By.CSS_SELECTOR, "#bench-n input")
    box.clear()
    box.send_keys(str(n))
    driver.find_element(By.ID, "bench-run").click()
    time.sleep(4)
    driver.find_element(By.ID, "bench-cancel").click()
    return wait_until(lambda: "Cancelled" in text_of(driver, "bench-status") and text_of(driver, "bench-status"),
                      timeout, "the benchmark to stop after Cancel")


def classroom_flow(driver, url: str, workdir: Path, shots: Path = SHOTS) -> dict:
    """Everything issue 16 asks a browser to show, in one session. Returns what was observed."""
    from selenium.webdriver.common.by import By

    seen: dict = {}
    load_demo(driver, url)
    seen["header"] = text_of(driver, "ask-header")
    seen["question"] = driver.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value")
    seen["default_methods"] = sorted(c.get_attribute("name") for c in
                                     driver.find_elements(By.CSS_SELECTOR, "#method-picker input[type=checkbox]")
                                     if c.is_selected())
    seen["cards"] = compare_current(driver, seen["default_methods"])
    seen["gold"] = gold_marks(driver)
    screenshot_page(driver, shots / "ask_1600.png", 1600)
    screenshot_page(driver, shots / "ask_800.png", 800)
    screenshot_element(driver, shots / "sources_history_800.png", 800, ["sources", "history"])
    driver.set_window_size(1400, 1000)
    seen["bad_knob"] = out_of_range_knob(driver)
    seen["bad_setting"] = out_of_range_setting(driver)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.execute_script("window.scrollTo(0, 0)")
    open_tab(driver, "Library")
    bad = workdir / "virus.exe"
    bad.write_bytes(b"MZ\x00\x00")
    upload_files(driver, [bad])
    wait_until(lambda: "Nothing was added" in text_of(driver, "library-status"), 120, "the rejected upload's status")
    seen["table_after_reject"] = text_of(driver, "documents-table")
    good = workdir / "eiffel.txt"
    good.write_text(DOCUMENT)
    upload_files(driver, [good])
    wait_until(lambda: "eiffel.txt" in text_of(driver, "documents-table"), 300, "eiffel.txt in the documents table")
    seen["status_after_good"] = text_of(driver, "library-status")
    seen["table_after_good"] = text_of(driver, "documents-table")
    screenshot_page(driver, shots / "library_1600.png", 1600, "documents-table")
    driver.set_window_size(1400, 1000)
    delete_with_confirmation(driver, "eiffel.txt")
    seen["table_after_delete"] = text_of(driver, "documents-table")
    seen["bench_status"] = start_and_cancel_benchmark(driver)
    seen["errors"] = error_toasts(driver)
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", default=str(ROOT / "assets" / "screenshots" / "ask.png"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--document", help="a file to upload (default: a short Eiffel Tower text)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--flow", action="store_true",
                        help="the classroom flow (demo, ✓/✗, uploads, delete, cancel) with screenshots in assets/screenshots")
    parser.add_argument("--home", help="reuse this data dir (e.g. one where `python -m ragdemo demo` already prepared)")
    args = parser.parse_args(argv)
    if args.flow:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            with running_app(Path(args.home) if args.home else tmp / "home", args.model, tmp / "app.log") as url:
                driver = chrome(tmp / "profile")
                try:
                    seen = classroom_flow(driver, url, tmp)
                except Exception:
                    driver.save_screenshot(str(SHOTS / "failure.png"))
                    print((tmp / "app.log").read_text()[-4000:])
                    raise
                finally:
                    driver.quit()
        for key, value in seen.items():
            print(f"{key}: {value}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        document = Path(args.document) if args.document else tmp / "eiffel.txt"
        if not args.document:
            document.write_text(DOCUMENT)
        with running_app(tmp / "home", args.model) as url:
            driver = chrome(tmp / "profile")
            try:
                cards = upload_and_compare(driver, url, document, args.question)
                for card in cards:
                    print(f"{card.method}: {card.answer!r} ttft={card.metrics.get('ttft_s')}")
                screenshot_cards(driver, Path(args.screenshot))
            finally:
                driver.quit()
    print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
