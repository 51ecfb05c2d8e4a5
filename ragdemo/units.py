"""How a byte count and a time read on every screen (cards, Library, CLI, status lines, bench tables): one
formatter each, so the same artifact or answer shows the same figure wherever a user meets it."""
from __future__ import annotations

UNITS = ("kB", "MB", "GB", "TB")


def three_figures(value: float) -> str | None:
    """`value` to three significant figures when it rounds below 1000, else None (it belongs to the next unit)."""
    for digits, limit in ((2, 10), (1, 100), (0, 1000)):
        text = f"{value:.{digits}f}"
        if abs(float(text)) < limit:
            return text
    return None


def fmt_bytes(n: float) -> str:
    """Decimal units, three significant figures: 512 B, 24.8 kB, 248 kB, 1.33 MB, 77.6 MB."""
    n = float(n or 0)
    if abs(round(n)) < 1000:
        return f"{n:.0f} B"
    for unit in UNITS:
        n /= 1000
        text = three_figures(n)
        if text is not None:
            return f"{text} {unit}"
    return f"{n:.0f} {UNITS[-1]}"


def fmt_s(seconds: float) -> str:
    """A measured time: 8 ms, 150 ms, 2.55 s."""
    seconds = float(seconds or 0)
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_duration(seconds: float) -> str:
    """An estimate, rounded as one: 33 s, 4.5 min, 12 min, 1.2 h (fmt_s's 32.76 s claims a precision it lacks)."""
    seconds = float(seconds or 0)
    if seconds < 1:
        return fmt_s(seconds)
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 59.5:
        return f"{minutes:.1f} min" if minutes < 9.95 else f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def fmt_speed(faster: float | None, reference: str = "RAG") -> str:
    """A speed ratio said one way on every screen: the reference's time over this one's, as '5.0x faster than
    RAG' or '1.3x slower than RAG' (never a bare ratio below 1); '–' when not measured."""
    said = fmt_ratio(faster)
    if said in ("–", "as fast"):
        return said if said == "–" else f"as fast as {reference}"
    return f"{said} than {reference}"


def fmt_ratio(faster: float | None) -> str:
    """`fmt_speed` without the reference, for table cells: '1.6x faster', '1.1x slower', 'as fast', '–'."""
    try:
        faster = float(faster)
    except (TypeError, ValueError):
        return "–"
    if not faster > 0 or faster == float("inf"):
        return "–"
    if round(faster, 1) == 1.0 and round(1 / faster, 1) == 1.0:
        return "as fast"
    return f"{faster:.1f}x faster" if faster > 1 else f"{1 / faster:.1f}x slower"
def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 question", "2 questions" (a count read aloud in a class should not say "1 questions")."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
