"""`status --watch`: refreshes in place on a terminal, one after another elsewhere."""

from __future__ import annotations

import pytest

from ground.errors import UpmtError
from upmt.cli import CLEAR_SCREEN, watch_output


def test_each_refresh_replaces_the_last_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["tunnels: 2 up", "tunnels: 1 up"])
    naps: list[float] = []
    watch_output(lambda: next(answers), 0.5, 2, "upmt-client status", clear=True, sleep=naps.append)
    out = capsys.readouterr().out
    screens = out.split(CLEAR_SCREEN)
    assert screens[0] == "" and len(screens) == 3  # cleared before each refresh
    assert screens[1].startswith("Every 0.5s: upmt-client status") and "2 up" in screens[1]
    assert "1 up" in screens[2] and "2 up" not in screens[2]
    assert naps == [0.5]  # no wait after the last refresh


def test_a_daemon_that_does_not_answer_shows_its_error_and_is_asked_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = 0

    def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise UpmtError("no daemon at /run/upmt/client.sock")
        return "up again"

    watch_output(fetch, 1.0, 2, None, clear=False, sleep=lambda _s: None)
    assert capsys.readouterr().out.splitlines() == [
        "error: no daemon at /run/upmt/client.sock",
        "up again",
    ]


def test_ctrl_c_ends_the_watch_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    watch_output(lambda: "x", 1.0, None, "t", clear=False, sleep=interrupted)
    assert "x" in capsys.readouterr().out
