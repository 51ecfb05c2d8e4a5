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
def running_app(home: Path, model: str = "default", log_path: Path | None = None, max_new_tokens: int = 32):
    """`python app.py` on a free port with its own data dir; yields the URL, stops the server afterwards."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "RAGDEMO_HOME": str(home),
           "RAGDEMO_MODEL": model, "RAGDEMO_MAX_NEW_TOKENS": str(max_new_tokens), "TOKENIZERS_PARALLELISM": "false"}
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


def read_cards(driver) -> list[CardReading]:
    from selenium.webdriver.common.by import By

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


def upload_and_compare(driver, url: str, documents: Path | list[Path], question: str = QUESTION,
                       methods: list[str] = METHODS, timeout: float = 240) -> list[CardReading]:
    """The user flow: upload through the file input, switch to Ask, pick methods, Compare, wait for every card."""
    from selenium.webdriver.common.by import By

    documents = [documents] if isinstance(documents, Path) else list(documents)
    driver.get(url)
    file_input = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload-files input[type=file]"), 60,
                            "the file input")[0]
    file_input.send_keys("\n".join(str(d) for d in documents))  # several files at once, as a user would pick them
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
    driver.find_element(By.ID, "compare-button").click()

    def all_done():
        errors = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if "rror" in t.text]
        if errors:
            raise AssertionError(f"the app showed an error: {errors}")
        cards = read_cards(driver)
        return cards if len(cards) == len(methods) and all(c.status == "done" for c in cards) else None

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", default=str(ROOT / "assets" / "screenshots" / "ask.png"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--document", help="a file to upload (default: a short Eiffel Tower text)")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)
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
