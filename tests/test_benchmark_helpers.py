"""The arithmetic of benchmark scripts whose numbers the README reports (the scripts themselves run for minutes)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))


@pytest.mark.parametrize("baseline_step", ["evaluate baseline", "baseline: evaluate"])
def test_arm_seconds_leaves_out_the_shared_steps_under_either_name(baseline_step):
    from arm_time import arm_seconds

    run = {"wall_seconds": 700.0, "timings": {"prepare": 0.5, baseline_step: 150.0, "gold: train": 500.0,
                                              "gold: evaluate": 40.0}}
    assert arm_seconds(run) == 549.5


def test_profile_summary_groups_operators_by_kind():
    from common import profile_summary

    events = [("aten::mm", 6.0), ("aten::_int_mm", 2.0), ("aten::addmm", 1.0), ("aten::mul", 0.5),
              ("aten::_scaled_dot_product_flash_attention_for_cpu", 0.5)]
    profile = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=k, self_cpu_time_total=s * 1e6)
                                                    for k, s in events])
    summary = profile_summary(profile, top=2)
    assert summary["profiled_seconds"] == 10.0
    assert summary["groups"]["floating-point matrix products"] == {"seconds": 7.0, "share": 0.7}
    assert summary["groups"]["int8 matrix products"]["share"] == 0.2
    assert summary["groups"]["other"]["seconds"] == 0.5 and summary["groups"]["attention"]["seconds"] == 0.5
    assert list(summary["top_operators"]) == ["aten::mm", "aten::_int_mm"]
