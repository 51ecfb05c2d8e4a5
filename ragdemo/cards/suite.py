"""The results suite as screens read it: the stamp, each section's data, read lazily and once per run."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.suite import STAMP_FILE, SUITE_DIR


@dataclass
class Suite:
    folder: Path
    stamp: dict
    _cache: dict = field(default_factory=dict)

    def data(self, section: str) -> dict | None:
        """A section's data file (a bench run's results.json, speed.json, storage.json, retrievers.json)."""
        if section not in self._cache:
            self._cache[section] = _read_section(self.folder / section)
        return self._cache[section]

    def rows(self, section: str) -> dict[str, dict]:
        """A bench section's summary rows by method label ({} when the section is not in this suite)."""
        data = self.data(section) or {}
        return {row["method"]: row for row in data.get("summary", [])}

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def relative(self, section: str = "") -> str:
        """The suite's folder (or a section's) as the checkout names it."""
        try:
            base = self.folder.relative_to(SUITE_DIR.parents[2]).as_posix()
        except ValueError:
            base = self.folder.as_posix()
        return f"{base}/{section}" if section else base

    def where(self) -> str:
        """One line: which run this is (what every quoted figure depends on)."""
        s = self.stamp
        load = lambda pair: f"{pair[0]:.1f}" if pair else "?"  # noqa: E731
        flags = "+".join(s.get("cpu_flags") or []) or "no AVX flags read"
        quick = "; QUICK MODE (a smoke test: the figures mean nothing)" if s.get("quick") else ""
        quick += f". **Stopped early:** {s['stopped']}" if s.get("stopped") else ""
        return (f"`{self.relative()}`, {s.get('date', '?')}, commit {s.get('commit') or '?'}; {s.get('cpu', '?')} "
                f"({s.get('cores', '?')} cores, {flags}), {s.get('model', '?')} in {s.get('dtype', '?')}; load average "
                f"{load(s.get('load_start'))} at the start, {load(s.get('load_end'))} at the end; wall time "
                f"{_minutes(s.get('wall_s'))}; `{s.get('command') or 'python -m ragdemo results'}`{quick}")


def _minutes(seconds) -> str:
    return f"{seconds / 60:.0f} min" if seconds else "?"


def _read_section(folder: Path) -> dict | None:
    for name in ("results.json", f"{folder.name}.json"):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def load_suite(folder: Path | None = None) -> Suite | None:
    """The suite at `folder` (default: the bundled one), or None when it has not been run in this checkout.
    Read again only when its stamp changes (a new run replaces the folder whole)."""
    folder = Path(folder or SUITE_DIR)
    try:
        mtime = (folder / STAMP_FILE).stat().st_mtime
    except OSError:
        return None
    return _read_suite(folder, mtime)


@functools.lru_cache(maxsize=4)
def _read_suite(folder: Path, mtime: float) -> Suite:
    return Suite(folder, json.loads((folder / STAMP_FILE).read_text()))
