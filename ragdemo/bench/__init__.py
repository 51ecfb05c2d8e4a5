"""Benchmarks: QA datasets, metrics, the runner, plots, and the speed bench."""
