"""Measured figures for method cards, read from the bench outputs bundled in assets/results/ (never copied by
hand): a run's `summary.md` (its header lines and its table) and, when bundled beside it, its `results.json`."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "results"


@dataclass
class MeasuredRun:
    """One bench run as its summary.md tells it."""

    path: Path
    meta: dict[str, str]  # the header's "- key: value" lines: data, model, machine, date, command, reference
    columns: list[str]  # the table's header cells
    rows: dict[str, list[str]]  # method label (without a "(NLL only)"-style remark) -> its cells

    @property
    def relative(self) -> str:
        try:
            return self.path.relative_to(RESULTS_DIR.parent.parent).as_posix()
        except ValueError:
            return self.path.as_posix()

    @property
    def max_new_tokens(self) -> int | None:
        found = re.search(r"max new tokens (\d+)", self.meta.get("model", ""))
        return int(found.group(1)) if found else None

    def knobs(self, method: str) -> dict[str, str]:
        """The knobs of `method` the run's command line set (`--set method.knob=value`); defaults are not named."""
        command = self.meta.get("command", "")
        return dict(re.findall(rf"(?<![\w.]){re.escape(method)}\.(\w+)=([^\s,;`]+)", command))

    @property
    def name(self) -> str:
        """The file's path under assets/results/, e.g. "btr_grid_summary.md"."""
        return self.path.relative_to(RESULTS_DIR).as_posix()

    @property
    def records(self) -> list[dict[str, str]]:
        """Every row as {column header: cell text}, in the file's order."""
        return [dict(zip(self.columns, cells)) for cells in self.rows.values()]

    def record(self, method: str) -> dict[str, str] | None:
        return dict(zip(self.columns, self.rows[method])) if method in self.rows else None

    def value(self, method: str, column: str) -> str | None:
        row = self.rows.get(method)
        return row[self.columns.index(column)] if row and column in self.columns else None

    def table(self, methods: list[str], columns: list[str] | None = None) -> str:
        """A markdown table of these methods' rows (in this order, those in the run), with these columns."""
        keep = [i for i, c in enumerate(self.columns) if columns is None or c in columns]
        lines = ["| " + " | ".join(self.columns[i] for i in keep) + " |", "|" + "---|" * len(keep)]
        lines += ["| " + " | ".join(self.rows[m][i] for i in keep) + " |" for m in methods if m in self.rows]
        return "\n".join(lines)

    def questions(self) -> list[dict] | None:
        """The per-question records of results.json beside the summary, or None when it is not bundled."""
        path = self.path.with_name("results.json")
        try:
            return json.loads(path.read_text())["questions"]
        except (OSError, ValueError, KeyError):
            return None


def measured_run(relative: str) -> MeasuredRun | None:
    """The run whose summary.md is at `relative` under assets/results/, or None when it is not there."""
    path = RESULTS_DIR / relative
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    meta, columns, rows = {}, [], {}
    for line in text.splitlines():
        if line.startswith("- ") and ": " in line and not columns:
            key, _, value = line[2:].partition(": ")
            meta[key.strip()] = value.strip()
        elif line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not columns:
                columns = cells
            else:
                rows.setdefault(cells[0].split(" (")[0], cells)  # "retro (indicative: ...)" is retro's row
        elif columns and rows and not line.startswith("|"):
            break  # the first table only (needle grids follow in some runs)
    return MeasuredRun(path, meta, columns, rows) if columns else None


SUMMARY_COLUMNS = ["method", "n", "F1", "contains", "value kept", "TTFT vs ref", "bytes/tok"]


def measured_table(relative: str, methods: list[str], columns: list[str] = SUMMARY_COLUMNS) -> str:
    """Card and README text: these methods' rows of the run at `relative` (value kept, contains, F1, TTFT against
    the run's reference, bytes per token with everything counted), or a line saying the run is not bundled."""
    run = measured_run(relative)
    if run is None or not all(m in run.rows for m in methods):
        return f"not measured in this checkout (`assets/results/{relative}` is missing or lacks some of these rows)"
    return f"{run.table(methods, columns)}\n\n(`{run.relative}`)"


def share(cell: str | None) -> float | None:
    """A summary cell such as "81%" or "0.89x" as a number (0.81, 0.89); None when absent or not a number."""
    try:
        return float(cell.rstrip("%x").replace(",", "")) / (100 if cell.endswith("%") else 1)
    except (AttributeError, ValueError):
        return None
