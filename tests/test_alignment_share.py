"""benchmarks/alignment_share.py: what it takes out of a bundle and how it reads the additions (no timing)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from tests.helpers import load_benchmark

_before = os.environ.get("OPENBLAS_NUM_THREADS")
try:
    share = load_benchmark("alignment_share")  # sets OPENBLAS_NUM_THREADS as predict does
finally:
    if _before is None:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = _before


@dataclass(frozen=True)
class Reference:
    field: object | None
    sensor: object | None
    search: object | None = "search"


def test_the_field_and_the_sensor_model_are_taken_out_and_the_search_stays():
    inspector = SimpleNamespace(_registration=Reference(field="field", sensor="sensor"))
    assert share.without_additions(inspector)._registration == Reference(None, None, "search")


def test_a_bundle_without_additions_is_refused():
    with pytest.raises(SystemExit, match="nothing to measure"):
        share.without_additions(SimpleNamespace(_registration=Reference(None, None)))


def test_the_additions_come_from_the_registration_stage_frame_by_frame():
    # (predict ms, registration ms, verdict): the frames without the additions spend more in regions
    fitted = [(180.0, 95.0, "pass/ok"), (170.0, 90.0, "pass/ok"), (200.0, 100.0, "reject/defect")]
    without = [(150.0, 60.0, "reject/defect"), (160.0, 55.0, "reject/defect"), (170.0, 62.0, "reject/defect")]
    s = share.summary({share.SIDES[0]: fitted, share.SIDES[1]: without})
    assert s["additions"] == 35.0  # median of 35, 35, 38; not 180 - 160
    assert s["predict"] == 180.0 and s["registration_without"] == 60.0
    assert s["share"] == pytest.approx(35 / 180) and s["over"] == pytest.approx(35 / 145)
