"""Defaults from the measured frontier: a fixed rule picks a method's default among candidate variants on one
question set, and a second set (other articles, other questions) checks the pick.

The rule is written down before the runs and applied to whatever they measure, so a card can say from the files
whether the default it ships is the one the rule picks and whether the other set confirms it."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .summary import interval_of


@dataclass(frozen=True)
class FrontierPoint:
    label: str
    value_kept: float
    value_high: float  # upper end of the value-kept 95% interval
    speedup: float  # TTFT vs the reference, > 1 = faster


@dataclass(frozen=True)
class DefaultCheck:
    """What the rule picks on the choosing set and how the shipped default fares on the confirming set."""

    default: str
    picked: str | None  # the rule's pick on the choosing set (None: no candidate measured)
    on_front: bool | None  # the default is on the confirming set's Pareto front (None: not measured there)
    value_high: float  # upper end of the default's value-kept interval on the confirming set
    bar: float
    dominated_by: tuple[str, ...] = ()  # confirming-set candidates both faster and keeping more value
    picked_there: str | None = None  # what the same rule would pick on the confirming set alone

    @property
    def matches(self) -> bool:
        return self.picked == self.default

    @property
    def reaches_bar(self) -> bool:
        return math.isfinite(self.value_high) and self.value_high >= self.bar

    @property
    def confirmed(self) -> bool:
        return self.matches and bool(self.on_front) and self.reaches_bar


def frontier_points(rows: dict[str, dict], labels: list[str]) -> list[FrontierPoint]:
    """The candidates measured in a bench run's summary rows, with a finite value kept and speed-up."""
    points = []
    for label in labels:
        row = rows.get(label)
        if not row:
            continue
        value = interval_of(row, "value_kept")
        speedup = float(row.get("speedup", float("nan")))
        if math.isfinite(value.value) and math.isfinite(speedup):
            points.append(FrontierPoint(label, value.value, value.high, speedup))
    return points


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(cost, quality) pairs: `a` costs no more and keeps no less than `b`, and is better on one of them."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, quality) points no other dominates, by cost: the frontier a plot draws."""
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _axes(point: FrontierPoint) -> tuple[float, float]:
    return (-point.speedup, point.value_kept)  # faster is cheaper


def dominating(point: FrontierPoint, points: list[FrontierPoint]) -> list[str]:
    """Candidates at least as good on both axes and better on one."""
    return [p.label for p in points if dominates(_axes(p), _axes(point))]


def pick_default(points: list[FrontierPoint], bar: float) -> str | None:
    """The fastest candidate keeping at least `bar` of the reference's value; if none does, the one keeping most."""
    if not points:
        return None
    good = [p for p in points if p.value_kept >= bar]
    best = max(good, key=lambda p: p.speedup) if good else max(points, key=lambda p: p.value_kept)
    return best.label


def check_default(choose_rows: dict[str, dict], confirm_rows: dict[str, dict], labels: list[str], default: str,
                  bar: float, rivals: list[str] = ()) -> DefaultCheck:
    """The rule over `labels` on the choosing rows; on the confirming rows, the default against the candidates and
    the `rivals` (variants measured beside them that the rule no longer picks from): none may beat it on both axes."""
    picked = pick_default(frontier_points(choose_rows, labels), bar)
    points = frontier_points(confirm_rows, labels)
    mine = next((p for p in points if p.label == default), None)
    there = pick_default(points, bar)
    if mine is None:
        return DefaultCheck(default, picked, None, float("nan"), bar, picked_there=there)
    beaten = tuple(dominating(mine, points + frontier_points(confirm_rows, [r for r in rivals if r not in labels])))
    return DefaultCheck(default, picked, not beaten, mine.value_high, bar, beaten, there)
