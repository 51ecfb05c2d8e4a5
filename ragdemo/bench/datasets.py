"""Benchmark datasets: SQuAD (bundled sample or the full dev file), needle-in-a-haystack, any QA JSONL.

Every dataset becomes a list of `Haystack`s: the documents of one fresh collection and the questions asked
over it. SQuAD and JSONL give one haystack; the needle test gives one per (context length, depth). A JSONL
question may be multiple choice ("options" and the index of the right one, "gold"): every method then also
scores each option by its own log-likelihood (bench/choices.py).
"""
from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..units import plural

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SQUAD_SAMPLE = ASSETS / "squad" / "squad_v1.1_dev_sample.json"
ESSAYS = ASSETS / "paul_graham_essays"

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
NEEDLE_KEYWORDS = ["sandwich", "Dolores Park"]
NEEDLE_LENGTHS = [1024, 2048, 4096]
NEEDLE_DEPTHS = [0, 25, 50, 75, 100]


@dataclass(frozen=True)
class Fact:
    """A made-up fact no model can know, so its answer is only in the document: needles of the scaling bench's
    long documents, and the multiple-choice tests (the right answer and three wrong ones of the same kind)."""

    sentence: str
    question: str
    answer: str
    distractors: tuple[str, str, str]


FACTS = (
    Fact("The lighthouse keeper on Varrow Island keeps a cat named Admiral Biscuit.",
         "What is the name of the cat kept by the lighthouse keeper on Varrow Island?", "Admiral Biscuit",
         ("Captain Whiskers", "Sergeant Pickles", "Duchess Marmalade")),
    Fact("The secret ingredient in Grandma Oleska's famous soup is roasted chestnuts.",
         "What is the secret ingredient in Grandma Oleska's famous soup?", "roasted chestnuts",
         ("smoked paprika", "pickled ginger", "toasted sesame")),
    Fact("The Pemberton Clockworks factory was founded in the town of Harrowgate Mill.",
         "In which town was the Pemberton Clockworks factory founded?", "Harrowgate Mill",
         ("Briarwood Cross", "Old Tillford", "Kestrel Bay")),
    Fact("The password to the Quillon Observatory is marigold seventeen.",
         "What is the password to the Quillon Observatory?", "marigold seventeen",
         ("juniper forty", "lavender nine", "saffron twelve")),
    Fact("The winning horse of the 1931 Tarrowby Cup was called Silver Parsnip.",
         "What was the name of the horse that won the 1931 Tarrowby Cup?", "Silver Parsnip",
         ("Golden Turnip", "Copper Radish", "Iron Beetroot")),
    Fact("The Velmora river freezes every year on the ninth of December.",
         "On what date does the Velmora river freeze every year?", "the ninth of December",
         ("the third of January", "the twentieth of November", "the first of February")),
    Fact("The mayor of Quenby keeps her spare keys inside a green teapot.",
         "Where does the mayor of Quenby keep her spare keys?", "inside a green teapot",
         ("under a red doormat", "in a blue flowerpot", "behind a yellow clock")),
    Fact("The chess club of Orlo Academy meets every Thursday in the old boathouse.",
         "Where does the chess club of Orlo Academy meet?", "in the old boathouse",
         ("in the school library", "in the east chapel", "in the glass greenhouse")),
    Fact("Professor Tamsin Achterberg's favourite instrument is the bass clarinet.",
         "What is Professor Tamsin Achterberg's favourite instrument?", "the bass clarinet",
         ("the viola", "the french horn", "the harpsichord")),
    Fact("The first ship built at the Dunholm shipyard was named the Patient Heron.",
         "What was the name of the first ship built at the Dunholm shipyard?", "the Patient Heron",
         ("the Restless Gull", "the Quiet Otter", "the Brave Falcon")),
    Fact("The annual kite festival in Marrowby is held on the longest day of the year.",
         "When is the annual kite festival in Marrowby held?", "on the longest day of the year",
         ("on the first day of spring", "on the last Sunday of October", "on the night of the full moon")),
    Fact("Dr. Ysolde Franck found the glowing fungus in a cave beneath Mount Serrin.",
         "Where did Dr. Ysolde Franck find the glowing fungus?", "in a cave beneath Mount Serrin",
         ("on the shore of Lake Ambry", "in the forest near Callow Ridge", "under the bridge at Dunmore")),
)


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]  # gold answers; the first one is scored for NLL
    keywords: list[str] = field(default_factory=list)  # extra containment check (needle)
    meta: dict = field(default_factory=dict)
    options: list[str] = field(default_factory=list)  # multiple choice: the candidate answers, in the file's order
    gold: int | None = None  # multiple choice: the index of the right option (its text is answers[0])


@dataclass
class Haystack:
    key: str  # short, unique within the dataset; part of the collection name
    documents: list[tuple[str, str]]  # (name, text), ingested in this order
    questions: list[Question]
    meta: dict = field(default_factory=dict)


@dataclass
class Dataset:
    name: str
    haystacks: list[Haystack]
    description: str = ""

    @property
    def n_questions(self) -> int:
        return sum(len(h.questions) for h in self.haystacks)


# ------------------------------------------------------------------- SQuAD
def load_squad(path: str | Path | None = None, n: int | None = None, seed: int = 0,
               articles: int | None = None) -> Dataset:
    """Whole articles (every paragraph) go into the collection; n questions are sampled over them by seed.

    `articles` limits the collection to that many articles, drawn by the same seed (all by default).
    """
    path = Path(path) if path else SQUAD_SAMPLE
    data = _read_json(path)
    try:
        entries = data["data"]
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a SQuAD file (expected a top-level 'data' list of articles)") from None
    rng = random.Random(seed)
    if articles is not None and articles < len(entries):
        entries = sorted(rng.sample(entries, articles), key=entries.index)
    documents, questions = [], []
    for article in entries:
        title = article.get("title", f"article{len(documents)}")
        documents.append((f"{title}.txt", "\n\n".join(p["context"].strip() for p in article["paragraphs"])))
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = _unique(a["text"] for a in qa.get("answers", []))
                if answers:
                    questions.append(Question(str(qa.get("id", len(questions))), qa["question"], answers,
                                              meta={"doc": f"{title}.txt", "paragraph": paragraph["context"].strip()}))
    questions = _sample(questions, n, rng)
    desc = (f"SQuAD v1.1 dev ({path.name}): {plural(len(documents), 'whole article')}, "
            f"{plural(len(questions), 'question')} (seed {seed})")
    return Dataset("squad", [Haystack("squad", documents, questions)], desc)


def _read_json(path: Path):
    if not path.exists():
        raise UserError(f"dataset file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read JSON ({exc})") from None


def _unique(texts) -> list[str]:
    seen: list[str] = []
    for t in texts:
        t = str(t).strip()
        if t and t not in seen:
            seen.append(t)
    return seen


def _sample(questions: list[Question], n: int | None, rng: random.Random) -> list[Question]:
    if n is None or n >= len(questions):
        return questions
    if n <= 0:
        raise UserError("--n must be a positive number of questions")
    return rng.sample(questions, n)


# ------------------------------------------------------------------- JSONL
def load_jsonl(path: str | Path, n: int | None = None, seed: int = 0) -> Dataset:
    """Lines of {"question", "answers": [...], "context"?: str, "doc"?: str}, or multiple choice with
    {"options": [...], "gold": i} (then "answers" may be left out: the gold option is the answer).

    Contexts become documents: those sharing a "doc" name are joined (each distinct text once); a context
    without "doc" is its own document. A file without any context needs an existing collection (--collection).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset file not found: {path}")
    docs: dict[str, list[str]] = {}
    questions = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _jsonl_row(path, line_no, line)
            context = str(row.get("context") or "").strip()
            doc = str(row.get("doc") or "").strip()
            if context:
                doc = doc or f"context{len(docs) + 1}"
                texts = docs.setdefault(doc, [])
                if context not in texts:
                    texts.append(context)
            options, gold = _choices(path, line_no, row)
            answers = row.get("answers", [])
            answers = answers if isinstance(answers, list) else [answers]
            given = [a["text"] if isinstance(a, dict) else a for a in answers]
            answers = _unique(([options[gold]] if options else []) + given)  # the gold option is scored for NLL
            if not answers:
                raise UserError(f"{path}:{line_no}: 'answers' is empty")
            questions.append(Question(str(row.get("id", line_no)), str(row["question"]), answers,
                                      meta={"doc": f"{doc}.txt" if doc else ""}, options=options, gold=gold))
    if not questions:
        raise UserError(f"{path}: no questions")
    documents = [(f"{name}.txt", "\n\n".join(texts)) for name, texts in docs.items()]
    questions = _sample(questions, n, random.Random(seed))
    desc = f"{path.name}: {plural(len(documents), 'document')}, {plural(len(questions), 'question')} (seed {seed})"
    return Dataset(path.stem, [Haystack("jsonl", documents, questions)], desc)


def _jsonl_row(path: Path, line_no: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{path}:{line_no}: not JSON ({exc})") from None
    if not isinstance(row, dict) or "question" not in row or ("answers" not in row and "options" not in row):
        raise UserError(f"{path}:{line_no}: each line needs 'question' and 'answers' (or 'options' and 'gold')")
    return row


def _choices(path: Path, line_no: int, row: dict) -> tuple[list[str], int | None]:
    """A multiple-choice row's (options, gold index), checked; ([], None) for an open question."""
    if "options" not in row and "gold" not in row:
        return [], None
    options, gold = row.get("options"), row.get("gold")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise UserError(f"{path}:{line_no}: 'options' must be a list of at least 2 non-empty strings")
    if len({o.strip() for o in options}) < len(options):
        raise UserError(f"{path}:{line_no}: 'options' has the same text twice")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise UserError(f"{path}:{line_no}: 'gold' must be the index of the right option, 0 to {len(options) - 1}")
    return [o.strip() for o in options], gold


# ------------------------------------------------------------------ needle
def essay_text(folder: Path | None = None) -> str:
    folder = folder or ESSAYS
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise UserError(f"no essays found in {folder}")
    return " ".join(re.sub(r"\s+", " ", f.read_text(encoding="utf-8")).strip() for f in files)


def needle_haystack(tokenizer, essays: str, length: int, depth: float, needle: str = NEEDLE) -> str:
    """`length` tokens of essays with the needle inserted at `depth` percent, moved back to a sentence start
    (as the original test does) so it never splits a sentence."""
    return needles_haystack(tokenizer, essays, length, [(needle, depth)])


def needles_haystack(tokenizer, essays: str, length: int, needles: list[tuple[str, float]]) -> str:
    """`length` tokens of essays with each (needle, depth percent) inserted at its depth, each moved back to a
    sentence start; the essay text is cut so that the whole stays about `length` tokens."""
    needle_tokens = sum(len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"]) for needle, _ in needles)
    budget = max(length - needle_tokens, 1)
    ids = tokenizer(essays[: budget * 8], add_special_tokens=False)["input_ids"][:budget]
    text = tokenizer.decode(ids)
    placed = sorted(((_sentence_start(text, depth), needle) for needle, depth in needles), key=lambda p: p[0])
    pieces, last = [], 0
    for cut, needle in placed:
        pieces += [text[last:cut].strip(), needle]
        last = cut
    pieces.append(text[last:].strip())
    return " ".join(piece for piece in pieces if piece)


def _sentence_start(text: str, depth: float) -> int:
    cut = int(len(text) * depth / 100)
    if 0 < cut < len(text):
        sentence_end = text.rfind(". ", 0, cut)
        cut = sentence_end + 1 if sentence_end >= 0 else 0
    return cut


def load_needle(tokenizer, lengths: list[int] | None = None, depths: list[float] | None = None,
                essays_dir: Path | None = None) -> Dataset:
    lengths = lengths or NEEDLE_LENGTHS
    depths = NEEDLE_DEPTHS if depths is None else depths
    essays = essay_text(essays_dir)
    haystacks = []
    for length in lengths:
        for depth in depths:
            key = f"L{length}-D{depth:g}"
            text = needle_haystack(tokenizer, essays, length, depth)
            question = Question(f"needle-{key}", NEEDLE_QUESTION, [NEEDLE_ANSWER], NEEDLE_KEYWORDS,
                                meta={"length": length, "depth": depth})
            haystacks.append(Haystack(key, [(f"haystack-{key}.txt", text)], [question],
                                      {"length": length, "depth": depth}))
    desc = (f"needle in a haystack: Paul Graham essays, lengths {lengths} tokens x depths {depths} %, "
            f"needle {NEEDLE!r}")
    return Dataset("needle", haystacks, desc)


def load_dataset(name: str, tokenizer=None, path: str | None = None, n: int | None = None, seed: int = 0,
                 articles: int | None = None, lengths: list[int] | None = None,
                 depths: list[float] | None = None) -> Dataset:
    """`squad`, `needle`, or a path to a .jsonl / SQuAD-layout .json(.gz) file."""
    if name == "squad":
        return load_squad(path, n, seed, articles)
    if name == "needle":
        if tokenizer is None:
            raise UserError("the needle dataset needs the model's tokenizer to size its haystacks")
        return load_needle(tokenizer, lengths, depths, Path(path) if path else None)
    file = Path(name)
    if file.suffix in {".jsonl"} or file.name.endswith(".jsonl.gz"):
        return load_jsonl(file, n, seed)
    if file.suffix in {".json", ".gz"}:
        return load_squad(file, n, seed, articles)
    raise UserError(f"unknown dataset {name!r}: use squad, needle, or a .jsonl file")
