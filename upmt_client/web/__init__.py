"""The client's web GUI (`--web ADDR:PORT`): its wiring to the daemon.

`start_web` serves the page (`upmt_client.web.server`, files in `static/`)
from threads of its own. Each API call runs in the daemon's trio thread: the
status is the daemon's `status()` (what `upmt-client status --json` shows)
with the applications grouped as `upmt-client apps` groups them, and a
handover is the control request `upmt-client handover APP --to IFACE` sends,
answered by the same code once the anchor has confirmed it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tunnel.addr import format_hostport
from upmt_client.flows import FlowBook
from upmt_client.web.server import WebGui

__all__ = ["WebGui", "page_status", "start_web", "web_url_answer"]

log = logging.getLogger("upmt.client")
JSON = dict[str, Any]


def page_status(status: JSON) -> JSON:
    """What the page shows: the daemon's status and its flows grouped by application."""
    return {**status, "apps": FlowBook.apps_json(status.get("flows", []))}


def web_url_answer(gui: WebGui | None) -> JSON:
    """The control answer to `web-url` (what `upmt-client web-url` prints)."""
    if gui is None:
        return {"ok": False, "error": "the web GUI is off (run the client with --web ADDR:PORT)"}
    return {"ok": True, "url": gui.url}


def start_web(
    stack: contextlib.ExitStack,
    endpoint: tuple[str, int] | None,
    status: Callable[[], JSON],
    control: Callable[[JSON], Awaitable[JSON]],
    *,
    token: str | None = None,
    inherited_fd: int | None = None,
) -> WebGui | None:
    """Serve the GUI at `endpoint` (None: off) until `stack` closes; logs its URL.

    Called from the daemon's trio thread. `token` and `inherited_fd` are the
    previous process's, after a restart in place.
    """
    sock = None if inherited_fd is None else socket.socket(fileno=inherited_fd)
    if endpoint is None:
        if sock is not None:
            sock.close()  # --web was dropped across the restart
        return None
    trio_token = trio.lowlevel.current_trio_token()

    def in_trio_status() -> JSON:
        return page_status(trio.from_thread.run_sync(status, trio_token=trio_token))

    def in_trio_handover(request: JSON) -> JSON:
        return trio.from_thread.run(control, request, trio_token=trio_token)

    gui = WebGui(*endpoint, in_trio_status, in_trio_handover, token=token, sock=sock)
    stack.callback(gui.close)
    log.info("web GUI on %s", gui.url)
    if not ipaddress.ip_address(endpoint[0]).is_loopback:
        log.warning(
            "--web %s is not a loopback address: whoever reaches it with the token "
            "can hand applications over",
            format_hostport(endpoint),
        )
    return gui
