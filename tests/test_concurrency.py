"""Four users ask different questions through the running app at the same moment (issue 8)."""
import html
import re
from concurrent.futures import ThreadPoolExecutor

from gradio_client import Client

from ragdemo.workbench import Workbench

from .ui_browser import DOCUMENT, running_app

QUESTIONS = {
    "When was the Eiffel Tower completed?": "Eiffel",
    "What do worker bees collect?": "bees",
    "Who patented the first practical telephone?": "telephone",
    "Where does the Danube flow?": "Danube",
}


def test_four_clients_at_once_each_get_their_own_complete_result(tmp_path, default_settings):
    home = default_settings.home
    Workbench(default_settings).ingest([("facts.txt", DOCUMENT.encode())], prepare=False)  # rag needs no artifacts
    with running_app(home, "default", log_path=tmp_path / "app.log", max_new_tokens=12) as url:
        def ask(question):
            client = Client(url, verbose=False)
            return client.predict(q=question, m=["rag"], c="default", g="", api_name="/compare")

        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(ask, QUESTIONS))
    for question, (cards, _chart, sees, sources, _history, *_status_and_knobs) in zip(QUESTIONS, outputs):
        assert "rd-error" not in cards and "data-status='done'" in cards, cards[:500]
        assert "class='rd-answer' style='white-space" in cards  # a non-empty answer
        seen = visible_text(sees)
        assert question in seen
        for other in QUESTIONS:
            if other != question:  # nothing of another user's run leaks into this one
                assert other not in seen
        assert QUESTIONS[question] in sources  # it read the passage about its own topic
    assert len(Workbench(default_settings).runs()) == 4


def visible_text(fragment: str) -> str:
    """The text a person reads in the "what the model sees" view (tokens are separate spans)."""
    fragment = re.sub(r"<span style='opacity:.45'>[^<]*</span>", "", fragment)  # newline markers
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))
