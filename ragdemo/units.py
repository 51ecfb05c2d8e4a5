"""How a byte count reads on every screen (cards, Library, CLI, status lines, bench tables): one formatter, so
the same artifact shows the same figure wherever a user meets it."""
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
