"""Student evaluation metrics and cascade calibration on fixed data."""

import pytest

from serve.students.calibrate import choose, curve, plot, table
from serve.students.metrics import exact_match, json_valid, score, token_overlap

SAMPLES = [(-3.0, 0.0), (-2.5, 0.0), (-2.0, 1.0), (-1.5, 0.0), (-1.0, 1.0), (-0.5, 1.0), (-0.2, 1.0), (-0.1, 1.0)]


def test_curve_endpoints_and_monotone_share():
    pts = curve(SAMPLES)
    assert (pts[0].teacher_share, pts[0].agreement) == (0.0, 5 / 8)
    assert (pts[-1].teacher_share, pts[-1].agreement) == (1.0, 1.0)
    shares = [p.teacher_share for p in pts]
    assert shares == sorted(shares)


@pytest.mark.parametrize("target,threshold,share", [
    (0.6, -3.0, 0.0),     # the student alone already agrees 5/8 of the time
    (0.75, -2.5, 0.125),  # escalating the least confident (wrong) answer
    (0.8, -2.0, 0.25),    # ... and the next one
    (1.0, -1.0, 0.5),     # the wrong answer at -1.5 must escalate too
])
def test_choose_predicted_threshold(target, threshold, share):
    chosen = choose(curve(SAMPLES), target)
    assert chosen is not None
    assert chosen.threshold == pytest.approx(threshold) and chosen.teacher_share == pytest.approx(share)
    assert chosen.agreement >= target


def test_choose_unreachable_and_empty():
    assert choose(curve(SAMPLES), 1.01) is None
    assert curve([]) == []


def test_table_and_plot(tmp_path):
    pts = curve(SAMPLES)
    assert table(pts).count("\n") == len(pts) + 1
    plot(pts, choose(pts, 0.75), 0.75, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics():
    assert exact_match(" Paris. ", "paris.") == 1.0 and exact_match("Paris", "Lyon") == 0.0
    assert token_overlap("the capital is Paris", "Paris is the capital") == 1.0
    assert 0 < token_overlap("Paris", "It is Paris") < 1 and token_overlap("a", "b") == 0.0
    assert json_valid('{"a": 1}', "", {"type": "object", "required": ["a"]}) == 1.0
    assert json_valid('{"b": 1}', "", {"type": "object", "required": ["a"]}) == 0.0
    assert json_valid("nope", "") == 0.0
    s = score([("a b", "a b", None), ("a", "b", None)], ["exact_match", "token_overlap"])
    assert s == {"exact_match": 0.5, "token_overlap": 0.5}
    with pytest.raises(ValueError):
        score([], ["bleu"])
