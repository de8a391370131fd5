import pytest

from prunekit.train.schedules import SCHEDULES, change_points, cubic, linear, make_schedule, oneshot


def test_oneshot():
    assert oneshot(0, final=0.9) == 0.9 and oneshot(4, final=0.9, at=5) == 0.0 and oneshot(5, final=0.9, at=5) == 0.9


def test_steps_hold_until_next_point():
    s = make_schedule("steps", points=[(0, 0.5), (10, 0.8), (20, 0.9)])
    assert [s(t) for t in (0, 9, 10, 19, 20, 100)] == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]


def test_linear_endpoints_and_middle():
    assert linear(0, final=0.8, end=10) == 0.0
    assert linear(5, final=0.8, end=10) == pytest.approx(0.4)
    assert linear(50, final=0.8, end=10) == pytest.approx(0.8)


def test_cubic_matches_zhu_gupta_formula():
    si, sf, t0, n, dt = 0.1, 0.9, 10, 5, 20
    for t in range(t0, t0 + n * dt + 1, dt):
        expect = sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic(t, final=sf, initial=si, start=t0, n=n, every=dt) == pytest.approx(expect)
    # held constant between pruning steps, and final after the last one
    assert cubic(t0 + 25, final=sf, initial=si, start=t0, n=n, every=dt) == cubic(t0 + 20, final=sf, initial=si,
                                                                                      start=t0, n=n, every=dt)
    assert cubic(10_000, final=sf, initial=si, start=t0, n=n, every=dt) == pytest.approx(sf)


def test_cubic_is_monotone_and_front_loaded():
    s = make_schedule("cubic", final=0.9, n=10, every=1)
    vals = [s(t) for t in range(11)]
    assert vals == sorted(vals)
    assert vals[5] > 0.9 * 0.5  # more than half of the pruning happens in the first half


def test_change_points():
    s = make_schedule("steps", points=[(0, 0.5), (3, 0.7)])
    assert change_points(s, 5) == [(0, 0.5), (3, 0.7)]


@pytest.mark.parametrize("name,kw,match", [
    ("cubic", dict(final=1.2, n=3), r"\[0, 1\)"),
    ("cubic", dict(final=0.5, n=0), ">= 1"),
    ("linear", dict(final=0.5, start=5, end=5), "greater than"),
    ("nope", {}, "known: cubic, linear, oneshot, steps"),
])
def test_bad_schedules_fail_when_made(name, kw, match):
    with pytest.raises((ValueError, KeyError), match=match):
        make_schedule(name, **kw)


def test_registry_lists_the_schedules():
    assert {"oneshot", "steps", "linear", "cubic"} <= set(SCHEDULES.names())
