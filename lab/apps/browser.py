"""A headless Chromium for the lab, driven by Selenium, inside one namespace.

`Browser(ns, workdir)` starts this module as a program in the namespace
(`ip netns exec NS python -m lab.apps.browser`), so chromedriver and Debian's
`chromium` see only that namespace's network: a page on its 127.0.0.1 is
reachable, nothing of the host's is. The program reads one JSON command per
line and answers each with one JSON line:

- `{"op": "get", "url": U}`: load the page;
- `{"op": "text", "css": C, "equals"|"contains": T, "wait": S}`: the text of
  the first element `C` matches, once it is (or contains) `T`, within `S` s;
- `{"op": "count", "css": C, "at_least": N, "wait": S}`: how many elements match;
- `{"op": "select", "css": C, "value": V}`, `{"op": "click", "css": C}`;
- `{"op": "screenshot", "path": P}`;
- `{"op": "quit"}`, or end of input.

An answer is `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ground.errors import UpmtError

if TYPE_CHECKING:  # Selenium is imported by the program only, in the namespace
    from selenium.webdriver.chromium.webdriver import ChromiumDriver as WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Nothing but the namespace's loopback: no QUIC, no background fetches, updates or
# sync; no name resolved (Chromium asks the resolver of /etc/resolv.conf about
# its own services even so); anything not on loopback sent to a proxy that is
# not there (loopback itself is never proxied).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
    "--window-size=1200,1100",
)
ROOT = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


class BrowserError(UpmtError):
    """The browser did not do what it was asked, or did not answer."""


def missing() -> str | None:
    """None when a browser can run here, else the reason it cannot."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    return None


class Browser:
    """The test's side: the program started in namespace `ns`, asked command by command."""

    def __init__(self, ns: str, workdir: Path) -> None:
        self.log = workdir / "browser.log"
        profile = workdir / "chromium-profile"
        shutil.rmtree(profile, ignore_errors=True)  # a fresh profile every time
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", ns, sys.executable, "-m", "lab.apps.browser"),
                    *("--profile", str(profile), "--driver-log", str(workdir / "chromedriver.log")),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                start_new_session=True,
            )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> JSON:
        """Send one command; its answer, or BrowserError with the browser's log."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps({"op": op, **args}) + "\n")
            stdin.flush()
        except OSError as exc:
            raise BrowserError(f"the browser is gone ({exc}):\n{self.log_tail()}") from None
        ready, _w, _x = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise BrowserError(f"no answer to {op} within {timeout:g} s:\n{self.log_tail()}")
        answer: JSON = json.loads(line)
        if not answer.get("ok"):
            raise BrowserError(f"{op} {args}: {answer.get('error')}")
        return answer

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, ValueError):
                self.call("quit", timeout=15)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the program, in the namespace -------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Headless Chromium over JSON lines.")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--driver-log", type=Path, default=None)
    args = parser.parse_args()
    profile = args.profile or Path(tempfile.mkdtemp(prefix="chromium-"))
    driver = _start(profile, args.driver_log)
    try:
        serve(driver, sys.stdin, sys.stdout)
    finally:
        driver.quit()
    return 0


def _start(profile: Path, driver_log: Path | None) -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # The driver's path is given: Selenium Manager (which would download one) never runs.
    service = Service(
        executable_path=CHROMEDRIVER, log_output=str(driver_log) if driver_log else None
    )
    return webdriver.Chrome(options=options, service=service)


def serve(driver: WebDriver, commands: IO[str], answers: IO[str]) -> None:
    for line in commands:
        try:
            command = json.loads(line)
            if command.get("op") == "quit":
                answers.write(json.dumps({"ok": True}) + "\n")
                answers.flush()
                return
            answer = {"ok": True, **_do(driver, command)}
        except Exception as exc:  # every failure is an answer: the test shows it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def _do(driver: WebDriver, command: JSON) -> JSON:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    op = command["op"]
    css = command.get("css", "")
    wait = float(command.get("wait", 0))
    if op == "get":
        driver.get(command["url"])
        return {"title": driver.title}
    if op == "text":
        last: list[str] = []

        def shown(d: WebDriver) -> bool:
            found = d.find_elements(By.CSS_SELECTOR, css)
            last[:] = [found[0].text] if found else []
            if not last:
                return False
            if "equals" in command:
                return bool(last[0] == command["equals"])
            return str(command.get("contains", "")) in last[0]

        if not _until(driver, wait, shown):
            raise BrowserError(f"{css}: {last[0]!r}" if last else f"nothing matches {css}")
        return {"text": last[0]}
    if op == "count":
        at_least = int(command.get("at_least", 0))
        counted = [0]

        def enough(d: WebDriver) -> bool:
            counted[0] = len(d.find_elements(By.CSS_SELECTOR, css))
            return counted[0] >= at_least

        if not _until(driver, wait, enough):
            raise BrowserError(f"{css}: {counted[0]} elements, not {at_least}")
        return {"count": counted[0]}
    if op == "select":
        Select(driver.find_element(By.CSS_SELECTOR, css)).select_by_value(command["value"])
        return {}
    if op == "click":
        element = WebDriverWait(driver, max(wait, 1)).until(
            lambda d: d.find_element(By.CSS_SELECTOR, css)
        )
        element.click()
        return {}
    if op == "screenshot":
        driver.save_screenshot(command["path"])
        return {}
    raise BrowserError(f"unknown op {op!r}")


def _until(driver: WebDriver, wait: float, condition: Callable[[WebDriver], bool]) -> bool:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, max(wait, 0.01), poll_frequency=0.1).until(condition)
    except TimeoutException:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
