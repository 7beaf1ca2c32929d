"""The web GUI's HTTP server: the page, its static files and a JSON API, behind a token.

A `ThreadingHTTPServer` in threads of its own serves the files of
`upmt_client/web/static/` and two API calls, `GET /api/status` and
`POST /api/handover`. It knows the daemon only through the two functions it
is given (`upmt_client.web.start_web` makes them run in the daemon's trio
thread), so it can be tested with fakes.

Every request must carry the token, a random string made at start (or kept
across a restart in place): `?token=` in the URL, or the `X-UPMT-Token`
header; without it the answer is 403, whatever the path. A handover takes
more: a POST with the token in the header and a JSON body, which neither a
link nor a cross-site form can send. Every answer forbids caching, sniffing,
framing and loading anything from elsewhere. No request can raise into the
daemon: a failure is a JSON answer with a status code.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from ground.errors import SetupError, UpmtError
from ground.names import is_ifname
from tunnel.addr import format_hostport

__all__ = ["MAX_BODY", "STATIC", "TOKEN_HEADER", "WebGui", "handover_request"]

log = logging.getLogger("upmt.web")
JSON = dict[str, Any]
StatusFn = Callable[[], JSON]
HandoverFn = Callable[[JSON], JSON]

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "X-UPMT-Token"
TOKEN_PLACEHOLDER = "__UPMT_TOKEN__"  # in index.html: the page's own links carry the token
MAX_BODY = 4096  # a handover request is a few dozen bytes
MAX_APP = 256
MAX_CONNECTIONS = 32  # served at once; more are closed unanswered
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the URL holds the token
}


def handover_request(body: object) -> JSON:
    """The control request for a handover body `{"app"|"flow", "to"}`; ValueError if malformed."""
    if not isinstance(body, dict):
        raise ValueError("the body is a JSON object")
    unknown = set(body) - {"app", "flow", "to"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    target = body.get("to")
    if not isinstance(target, str) or not is_ifname(target):
        raise ValueError("'to' names an interface")
    app, flow = body.get("app"), body.get("flow")
    if (app is None) == (flow is None):
        raise ValueError("give either 'app' or 'flow'")
    if app is not None:
        if not isinstance(app, str) or not 0 < len(app) <= MAX_APP:
            raise ValueError(f"'app' is an application name of 1 to {MAX_APP} characters")
        return {"cmd": "handover", "app": app, "to": target}
    if not isinstance(flow, int) or isinstance(flow, bool) or flow < 0:
        raise ValueError("'flow' is a flow id")
    return {"cmd": "handover", "flow": flow, "to": target}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung request never holds the daemon's exit
    block_on_close = False
    gui: WebGui

    def __init__(self, gui: WebGui) -> None:
        super().__init__(("", 0), _Handler, bind_and_activate=False)
        self.gui = gui
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class WebGui:
    """The HTTP endpoint, serving at once; `url` has the token, `close` stops it.

    `sock`, a listening socket handed over by a restart in place, is used
    when it is bound where asked (the port and every open page keep
    working), else closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        status: StatusFn,
        handover: HandoverFn,
        *,
        token: str | None = None,
        sock: socket.socket | None = None,
        static: Path = STATIC,
    ) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.status = status
        self.handover = handover
        self.files = _load_static(static)
        self._sock = _listening(host, port, sock)
        # select() may call a connection ready that is gone by accept(): a blocking
        # accept would then hold the server, and its shutdown, forever.
        self._sock.setblocking(False)
        self.address: tuple[str, int] = (host, int(self._sock.getsockname()[1]))
        self._server = _Server(self)
        self._server.socket.close()
        self._server.socket = self._sock
        self._server.server_address = self._sock.getsockname()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="upmt-web", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{format_hostport(self.address)}/?token={self.token}"

    def fileno(self) -> int:
        return self._sock.fileno()

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.token.encode()
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _listening(host: str, port: int, sock: socket.socket | None) -> socket.socket:
    if sock is not None:
        bound = sock.getsockname()
        if (bound[0], bound[1]) == (host, port):
            return sock
        sock.close()  # --web changed across the restart
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fresh = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart or a quick stop and start finds the port in TIME_WAIT.
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        fresh.bind((host, port))
        fresh.listen(16)
    except OSError as exc:
        fresh.close()
        raise SetupError(f"--web {format_hostport((host, port))}: {exc.strerror or exc}") from None
    return fresh


def _load_static(folder: Path) -> dict[str, bytes]:
    """The page's files by name, read once: a file changed under a running daemon is not served."""
    try:
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in CONTENT_TYPES}
    except OSError as exc:
        raise SetupError(f"web GUI files: {folder}: {exc.strerror or exc}") from None
    if "index.html" not in files:
        raise SetupError(f"web GUI files: {folder} has no index.html")
    return files


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "upmt-client"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    # -- dispatch ------------------------------------------------------------
    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def do_HEAD(self) -> None:
        self._guarded(self._not_allowed)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD

    def _guarded(self, serve: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path
        try:
            serve(path)
        except Exception as exc:  # never into the server's thread, let alone the daemon
            log.warning("web: %s %s failed: %r", self.command, path, exc)
            with contextlib.suppress(OSError):
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"ok": False, "error": "failed"})

    def _query_token(self) -> str | None:
        values = parse_qs(urlsplit(self.path).query).get("token")
        return values[0] if values else None

    def _refuse(self) -> None:
        self._json(HTTPStatus.FORBIDDEN, {"ok": False, "error": "a valid token is required"})

    def _not_allowed(self, path: str) -> None:
        if not self.server.gui.token_ok(self.headers.get(TOKEN_HEADER) or self._query_token()):
            self._refuse()
            return
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"ok": False, "error": "method not allowed"})

    def _get(self, path: str) -> None:
        gui = self.server.gui
        if not gui.token_ok(self.headers.get(TOKEN_HEADER) or self._query_token()):
            self._refuse()
            return
        if path in ("/", "/index.html"):
            page = gui.files["index.html"].replace(TOKEN_PLACEHOLDER.encode(), gui.token.encode())
            self._send(HTTPStatus.OK, CONTENT_TYPES[".html"], page)
        elif (name := path.removeprefix("/static/")) != path and name in gui.files:
            if name == "index.html":  # the page only with its token filled in, at /
                self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": f"no {path}"})
                return
            self._send(HTTPStatus.OK, CONTENT_TYPES[Path(name).suffix], gui.files[name])
        elif path == "/api/status":
            self._api(gui.status)
        elif path == "/api/handover":
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"ok": False, "error": "POST a handover"})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": f"no {path}"})

    def _post(self, path: str) -> None:
        gui = self.server.gui
        # The header only: a form or a link can put the token in the URL, not here.
        if not gui.token_ok(self.headers.get(TOKEN_HEADER)):
            self._refuse()
            return
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            self._json(HTTPStatus.FORBIDDEN, {"ok": False, "error": "cross-origin request"})
            return
        if path != "/api/handover":
            self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": f"no {path}"})
            return
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._json(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"ok": False, "error": "send application/json"}
            )
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._json(HTTPStatus.LENGTH_REQUIRED, {"ok": False, "error": "Content-Length needed"})
            return
        if int(length) > MAX_BODY:
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"ok": False, "error": f"at most {MAX_BODY} bytes"},
            )
            return
        raw = self.rfile.read(int(length))
        try:
            request = handover_request(json.loads(raw))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": f"bad request: {exc}"})
            return
        self._api(lambda: gui.handover(request))

    def _api(self, call: Callable[[], JSON]) -> None:
        try:
            answer = call()
        except UpmtError as exc:  # the daemon refused: a bad interface, an unknown flow
            self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": str(exc)})
            return
        except (trio.RunFinishedError, trio.Cancelled) as exc:  # trio's loop is ending
            log.debug("web: the daemon did not answer: %r", exc)
            self._json(
                HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": "the client is stopping"}
            )
            return
        if not answer.get("ok", True):
            self._json(HTTPStatus.BAD_REQUEST, answer)
            return
        self._json(HTTPStatus.OK, answer)

    # -- answers ---------------------------------------------------------------
    def _json(self, code: HTTPStatus, obj: JSON) -> None:
        body = json.dumps(obj, separators=(",", ":"), default=str).encode()
        self._send(code, "application/json", body)

    def _send(self, code: HTTPStatus, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A malformed request: JSON with the same headers as every other answer."""
        self.close_connection = True
        status = HTTPStatus(code)
        self._json(status, {"ok": False, "error": message or status.phrase})

    # The URL holds the token: never in the log.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = urlsplit(getattr(self, "path", "")).path  # none yet for a malformed request
        log.debug("web: %s %s %s", self.command, path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: %s", (format % args).split("?", 1)[0])
