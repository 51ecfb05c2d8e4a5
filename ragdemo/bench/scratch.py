"""The throwaway store every benchmark runs in, so the user's library is never touched and nothing is left behind."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_workbench(settings, name: str, keep: Path | None = None):
    """A Workbench over a temporary home (models are shared with the process's loaded ones), removed on exit;
    with `keep`, over that folder instead, emptied first and left in place for inspection."""
    from ..workbench import Workbench

    home = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"ragdemo-{name}-"))
    if keep and home.exists():
        shutil.rmtree(home)
    bench = Workbench(settings.with_(home=home))
    try:
        yield bench
    finally:
        bench.store.close()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
