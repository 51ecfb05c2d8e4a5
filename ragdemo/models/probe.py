"""Timing probes that pick a kernel at load (models/packed.py, models/attention.py) and that bench-speed reuses."""
from __future__ import annotations

import time

import torch


def best_seconds(kernels: dict, inputs: tuple, rounds: int, reps: int = 3) -> dict:
    """Each kernel's best time per call over interleaved rounds, so a busy moment slows all of them alike
    instead of flipping a choice; one warm-up call each first (kernel selection, packing)."""
    def seconds(kernel, reps):
        started = time.perf_counter()
        for _ in range(reps):
            kernel(*inputs)
        return (time.perf_counter() - started) / reps

    best = {name: float("inf") for name in kernels}
    with torch.no_grad():
        for kernel in kernels.values():
            seconds(kernel, 1)
        for _ in range(rounds):
            for name, kernel in kernels.items():
                best[name] = min(best[name], seconds(kernel, reps))
    return best
