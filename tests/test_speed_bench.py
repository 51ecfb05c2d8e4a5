def test_speed_bench_quick_runs_and_reports(tiny_bench, capsys, monkeypatch):
    from ragdemo.bench import speed

    monkeypatch.setattr(speed, "bench_load", lambda settings: print("model load: skipped in the fast test"))
    monkeypatch.setattr(speed, "bench_prefill", lambda settings, lengths: print("prefill: skipped in the fast test"))
    speed.run_speed_bench(tiny_bench, quick=True)
    out = capsys.readouterr().out
    assert "tokens/s" in out and "10000 chunks" in out and "median" in out
