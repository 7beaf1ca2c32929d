"""The quality benchmark's E-model (ITU-T G.107, simplified) against known points."""

import pytest

from benchmarks.quality import mos, r_factor


def test_a_clean_short_path_rates_as_g711_does() -> None:
    # G.711 with no loss and little delay: R 93.2 - Id, MOS about 4.4.
    assert r_factor(0.0, 0.0) == pytest.approx(93.2)
    assert mos(93.2) == pytest.approx(4.41, abs=0.01)


def test_delay_beyond_177_ms_costs_more_than_before() -> None:
    assert r_factor(150.0, 0.0) == pytest.approx(93.2 - 3.6)
    assert r_factor(277.3, 0.0) == pytest.approx(93.2 - 0.024 * 277.3 - 11.0)


def test_loss_under_concealment() -> None:
    # Ie-eff = 95 * Ppl / (Ppl + Bpl) with Bpl = 25.1: 2 % loss costs about 7 points.
    assert r_factor(0.0, 0.02) == pytest.approx(93.2 - 95 * 2 / 27.1)
    assert mos(r_factor(0.0, 0.10)) < 3.5 < mos(r_factor(0.0, 0.01))


def test_mos_is_bounded() -> None:
    assert mos(-5) == 1.0 and mos(120) == 4.5
    assert all(1.0 <= mos(r) <= 4.5 for r in range(0, 101))
