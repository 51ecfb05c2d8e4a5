"""The rule that picks a method's default on one question set and checks it on another (bench/defaults.py), and
the suite's BTR candidates it runs over."""
import dataclasses

from ragdemo.bench.defaults import check_default, dominating, frontier_points, pick_default
from ragdemo.bench.specs import parse_method_specs
from ragdemo.bench.suite import (BTR_CANDIDATES, BTR_DEFAULT, BTR_UNTRAINED, HELDOUT_METHODS, SQUAD_METHODS,
                                 default_row)


def row(value, speedup, high=None):
    return {"value_kept": value, "speedup": speedup,
            "value_kept_interval": {"value": value, "low": value - 0.2, "high": value + 0.2 if high is None else high}}


def test_the_rule_picks_the_fastest_variant_above_the_bar():
    rows = {"a": row(1.10, 1.2), "b": row(0.96, 1.8), "c": row(0.80, 2.5), "rag": row(1.0, 1.0)}
    assert pick_default(frontier_points(rows, ["a", "b", "c"]), 0.95) == "b"


def test_without_a_variant_above_the_bar_the_rule_picks_the_one_keeping_most():
    rows = {"a": row(0.70, 1.2), "b": row(0.90, 1.1), "c": row(0.50, 2.5)}
    assert pick_default(frontier_points(rows, ["a", "b", "c"]), 0.95) == "b"


def test_rows_not_measured_are_left_out():
    rows = {"a": row(float("nan"), 1.5), "b": row(0.9, 1.1)}
    assert [p.label for p in frontier_points(rows, ["a", "b", "missing"])] == ["b"]
    assert pick_default([], 0.95) is None


def test_a_point_is_dominated_only_by_one_at_least_as_good_on_both_axes():
    points = frontier_points({"a": row(0.9, 1.5), "b": row(1.0, 1.5), "c": row(1.2, 1.0)}, ["a", "b", "c"])
    assert dominating(points[0], points) == ["b"]
    assert dominating(points[1], points) == []


def test_confirmed_only_when_picked_on_the_front_and_within_reach_of_the_bar():
    choose = {"btr": row(1.0, 2.0), "btr@x": row(1.1, 1.2)}
    confirm = {"btr": row(0.8, 1.9, high=0.97), "btr@x": row(0.9, 1.1)}
    check = check_default(choose, confirm, ["btr", "btr@x"], "btr", 0.95)
    assert check.matches and check.on_front and check.reaches_bar and check.confirmed

    low = {"btr": row(0.6, 1.9, high=0.75), "btr@x": row(0.9, 1.1)}
    assert not check_default(choose, low, ["btr", "btr@x"], "btr", 0.95).confirmed

    beaten = {"btr": row(0.8, 1.9, high=0.97), "btr@x": row(0.9, 2.0)}
    check = check_default(choose, beaten, ["btr", "btr@x"], "btr", 0.95)
    assert check.dominated_by == ("btr@x",) and not check.confirmed

    assert check_default(choose, low, ["btr", "btr@x"], "btr", 0.95).picked_there == "btr@x"

    other_pick = {"btr": row(0.9, 2.0), "btr@x": row(1.1, 1.2)}
    assert not check_default(other_pick, confirm, ["btr", "btr@x"], "btr", 0.95).matches


def test_a_rival_outside_the_candidates_can_still_beat_the_default():
    choose = {"btr": row(1.0, 2.0), "btr@x": row(1.1, 1.2)}
    confirm = {"btr": row(0.9, 1.9, high=0.97), "btr@x": row(0.9, 1.1), "old": row(1.0, 2.1)}
    assert check_default(choose, confirm, ["btr", "btr@x"], "btr", 0.95).confirmed
    check = check_default(choose, confirm, ["btr", "btr@x"], "btr", 0.95, rivals=["old", "btr"])
    assert check.dominated_by == ("old",) and not check.confirmed


def test_the_btr_rows_are_distinct_and_name_the_shipped_knobs():
    labels = BTR_UNTRAINED + BTR_CANDIDATES
    params = {spec.label: spec.params(24) for spec in parse_method_specs(labels)}
    assert len({repr(p) for p in params.values()}) == len(labels)
    default = parse_method_specs(["btr"])[0].params(24)
    # the trained candidate is the shipped knobs plus training; the default row is them without an adapter
    assert params[BTR_DEFAULT] == dataclasses.replace(default, train=True)
    assert params[default_row("btr")] == dataclasses.replace(default, lora=False)
    assert all(params[label].train for label in BTR_CANDIDATES)
    assert not any(params[label].lora or params[label].train for label in BTR_UNTRAINED)
    assert all(label in SQUAD_METHODS and label in HELDOUT_METHODS for label in labels)
