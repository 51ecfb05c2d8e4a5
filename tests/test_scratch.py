"""Every benchmark runs in a throwaway store: the user's library is untouched and nothing is left behind."""
import pytest

from ragdemo.bench.scratch import scratch_workbench
from ragdemo.store import Store


def test_scratch_store_is_removed_even_when_the_run_fails(tiny_settings):
    library = tiny_settings.home
    with pytest.raises(RuntimeError):
        with scratch_workbench(tiny_settings, "test") as bench:
            home = bench.settings.home
            assert home != library and home.name.startswith("ragdemo-test-")
            bench.store.collection_id("scratch")  # writes the scratch store's database
            assert any(home.iterdir())
            raise RuntimeError("the benchmark failed")
    assert not home.exists()
    assert "scratch" not in {c["name"] for c in Store(library).collections()}  # the library never saw it


def test_kept_scratch_store_starts_empty_and_stays(tiny_settings, tmp_path):
    keep = tmp_path / "out" / "store"
    keep.mkdir(parents=True)
    (keep / "old-run.txt").write_text("from the previous run")
    with scratch_workbench(tiny_settings, "test", keep) as bench:
        assert bench.settings.home == keep and not (keep / "old-run.txt").exists()
        bench.store.collection_id("kept")
    assert keep.is_dir() and any(keep.iterdir())
