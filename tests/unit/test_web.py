"""The web GUI's server over real HTTP on loopback, with fake status and handover functions.

The token is required for the page, its static files and the API; a
handover must be a POST with the token in a header and a valid JSON body; every
answer carries its content type and the security headers; a failure of the
daemon is a JSON answer, never an exception in the server.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ground.errors import ConfigError, SetupError
from tests.unit.test_cli_errors import assert_one_line_error, run
from tests.unit.test_client_config import build
from upmt.control import bind_control_socket, serve_control
from upmt_client.web import page_status, web_url_answer
from upmt_client.web.server import MAX_BODY, STATIC, TOKEN_HEADER, WebGui, handover_request

JSON = dict[str, Any]
STATUS: JSON = {
    "ok": True,
    "terminal_id": "mh1",
    "vipa": "100.64.0.2",
    "flows": [
        {
            "id": 1,
            "app": "cbr-recv",
            "exe": "/usr/bin/cbr-recv",
            "pid": 42,
            "interface": "if0",
            "bytes": 300,
        }
    ],
}


class Fake:
    """The daemon's side: a status, and handovers recorded (or refused, or failing)."""

    def __init__(self) -> None:
        self.handovers: list[JSON] = []
        self.fail: BaseException | None = None

    def status(self) -> JSON:
        if self.fail is not None:
            raise self.fail
        return page_status(STATUS)

    def handover(self, request: JSON) -> JSON:
        if self.fail is not None:
            raise self.fail
        self.handovers.append(request)
        return {"ok": True, "moved": 1, "flows": 1, "to": request["to"], "anchor": "200 OK"}


@pytest.fixture
def served() -> Iterator[tuple[WebGui, Fake]]:
    fake = Fake()
    gui = WebGui("127.0.0.1", 0, fake.status, fake.handover)
    try:
        yield gui, fake
    finally:
        gui.close()


def request(
    gui: WebGui,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*gui.address, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def post(gui: WebGui, body: object, **headers: str) -> tuple[int, JSON]:
    raw = json.dumps(body).encode()
    sent = {TOKEN_HEADER: gui.token, "Content-Type": "application/json", **headers}
    code, _headers, answer = request(gui, "POST", "/api/handover", raw, sent)
    return code, json.loads(answer)


def test_the_url_holds_a_random_token(served: tuple[WebGui, Fake]) -> None:
    gui, fake = served
    other = WebGui("127.0.0.1", 0, fake.status, fake.handover)
    try:
        assert len(gui.token) >= 32 and gui.token != other.token
    finally:
        other.close()
    assert gui.url == f"http://127.0.0.1:{gui.address[1]}/?token={gui.token}"


@pytest.mark.parametrize(
    "path", ["/", "/index.html", "/static/app.js", "/static/style.css", "/api/status", "/nope"]
)
def test_without_the_token_everything_is_refused(served: tuple[WebGui, Fake], path: str) -> None:
    gui, _fake = served
    for suffix, headers in [
        ("", {}),
        ("?token=", {}),
        ("?token=" + gui.token[:-1] + ("y" if gui.token.endswith("x") else "x"), {}),
        ("", {TOKEN_HEADER: "wrong"}),
        ("?token=%ff%fe", {}),  # not even UTF-8
    ]:
        code, got, body = request(gui, "GET", path + suffix, headers=headers)
        assert code == 403, (path, suffix)
        assert got["content-type"] == "application/json"
        assert gui.token.encode() not in body
        assert json.loads(body) == {"ok": False, "error": "a valid token is required"}


def test_the_page_and_its_files_with_the_token(served: tuple[WebGui, Fake]) -> None:
    gui, _fake = served
    code, headers, page = request(gui, "GET", f"/?token={gui.token}")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    # The page's own links carry the token, so its script and style load.
    assert f'src="/static/app.js?token={gui.token}"'.encode() in page
    assert f'href="/static/style.css?token={gui.token}"'.encode() in page
    assert b"__UPMT_TOKEN__" not in page
    for ident in (b'id="vipa"', b'id="tunnels"', b'id="rtt-chart"', b'id="apps"'):
        assert ident in page
    assert not re.search(rb"https?://", page), "nothing loaded from elsewhere"
    for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        code, headers, body = request(gui, "GET", f"/static/{name}?token={gui.token}")
        assert code == 200 and headers["content-type"] == f"{ctype}; charset=utf-8"
        assert body == (STATIC / name).read_bytes()
    # The token in the header is as good (the API's way).
    code, _headers, _body = request(gui, "GET", "/static/app.js", headers={TOKEN_HEADER: gui.token})
    assert code == 200
    for other in ("/static/../server.py", "/static/index.html", "/static/", "/app.js"):
        code, _headers, body = request(gui, "GET", f"{other}?token={gui.token}")
        assert code == 404 and b"import" not in body and b"<html" not in body, other


def test_every_answer_forbids_caching_sniffing_framing_and_other_origins(
    served: tuple[WebGui, Fake],
) -> None:
    gui, _fake = served
    for path in ("/", f"/?token={gui.token}", f"/api/status?token={gui.token}"):
        _code, headers, _body = request(gui, "GET", path)
        assert headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"


def test_the_status_api_adds_the_applications(served: tuple[WebGui, Fake]) -> None:
    gui, _fake = served
    code, headers, body = request(gui, "GET", "/api/status", headers={TOKEN_HEADER: gui.token})
    assert code == 200 and headers["content-type"] == "application/json"
    status = json.loads(body)
    assert status["vipa"] == "100.64.0.2"
    (app,) = status["apps"]
    assert app["app"] == "cbr-recv" and app["interfaces"] == ["if0"] and app["flows"] == [1]


def test_a_handover_is_the_control_request(served: tuple[WebGui, Fake]) -> None:
    gui, fake = served
    code, answer = post(gui, {"app": "cbr-recv", "to": "if1"})
    assert code == 200 and answer["moved"] == 1 and answer["to"] == "if1"
    code, answer = post(gui, {"flow": 7, "to": "if0"}, Origin=f"http://127.0.0.1:{gui.address[1]}")
    assert code == 200
    assert fake.handovers == [
        {"cmd": "handover", "app": "cbr-recv", "to": "if1"},
        {"cmd": "handover", "flow": 7, "to": "if0"},
    ]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"to": "if1"},
        {"app": "a", "flow": 1, "to": "if1"},
        {"app": "", "to": "if1"},
        {"app": "x" * 257, "to": "if1"},
        {"app": 5, "to": "if1"},
        {"flow": True, "to": "if1"},
        {"flow": "7", "to": "if1"},
        {"app": "a", "to": "if 1"},
        {"app": "a", "to": None},
        {"app": "a", "to": "if1", "cmd": "restart"},  # no other control command through here
    ],
)
def test_a_malformed_handover_is_400(served: tuple[WebGui, Fake], body: object) -> None:
    gui, fake = served
    code, answer = post(gui, body)
    assert code == 400 and answer["ok"] is False and answer["error"].startswith("bad request")
    assert fake.handovers == []
    with pytest.raises(ValueError):
        handover_request(body)


def test_a_handover_needs_post_the_header_token_json_and_a_bounded_body(
    served: tuple[WebGui, Fake],
) -> None:
    gui, fake = served
    body = json.dumps({"app": "cbr-recv", "to": "if1"}).encode()
    json_type = {"Content-Type": "application/json"}
    # A link or a form: GET, or the token in the URL only.
    code, _h, _b = request(gui, "GET", f"/api/handover?token={gui.token}")
    assert code == 405
    code, _h, _b = request(gui, "POST", f"/api/handover?token={gui.token}", body, json_type)
    assert code == 403
    # A cross-site form can send only form encodings; a page elsewhere has its own origin.
    form = {TOKEN_HEADER: gui.token, "Content-Type": "application/x-www-form-urlencoded"}
    code, _h, _b = request(gui, "POST", "/api/handover", body, form)
    assert code == 415
    code, _answer = post(gui, {"app": "cbr-recv", "to": "if1"}, Origin="http://evil.example")
    assert code == 403
    big = json.dumps({"app": "x" * MAX_BODY, "to": "if1"}).encode()
    code, _h, _b = request(
        gui, "POST", "/api/handover", big, {TOKEN_HEADER: gui.token, **json_type}
    )
    assert code == 413
    code, _h, _b = request(
        gui, "POST", "/api/handover", b"{not json", {TOKEN_HEADER: gui.token, **json_type}
    )
    assert code == 400
    code, _h, _b = request(gui, "PUT", "/api/handover", body, {TOKEN_HEADER: gui.token})
    assert code == 405
    code, _h, _b = request(gui, "PUT", "/api/handover", body)
    assert code == 403
    assert fake.handovers == []


def test_the_daemons_refusal_and_failure_are_answers(served: tuple[WebGui, Fake]) -> None:
    gui, fake = served
    fake.fail = ConfigError("'if9' is not one of if0, if1")
    code, answer = post(gui, {"app": "cbr-recv", "to": "if9"})
    assert code == 400 and answer == {"ok": False, "error": "'if9' is not one of if0, if1"}
    fake.fail = trio.RunFinishedError("the loop is gone")
    code, _h, body = request(gui, "GET", "/api/status", headers={TOKEN_HEADER: gui.token})
    assert code == 503 and json.loads(body)["ok"] is False
    fake.fail = KeyError("a bug")
    code, _h, body = request(gui, "GET", "/api/status", headers={TOKEN_HEADER: gui.token})
    assert code == 500 and json.loads(body) == {"ok": False, "error": "failed"}
    fake.fail = None  # the server still serves
    code, _h, _b = request(gui, "GET", "/api/status", headers={TOKEN_HEADER: gui.token})
    assert code == 200


def test_a_malformed_request_is_a_json_answer(served: tuple[WebGui, Fake]) -> None:
    gui, _fake = served
    with socket.create_connection(gui.address, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _sep, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 431") and b"nosniff" in head
    assert json.loads(body)["ok"] is False


def test_a_handed_over_socket_keeps_the_port_and_token(served: tuple[WebGui, Fake]) -> None:
    """After a restart in place: the same listening socket, the same URL."""
    gui, fake = served
    inherited = socket.socket(fileno=os.dup(gui.fileno()))  # what the next process adopts
    again = WebGui(*gui.address, fake.status, fake.handover, token=gui.token, sock=inherited)
    try:
        assert again.url == gui.url and again.fileno() == inherited.fileno()
        code, _h, _b = request(again, "GET", f"/api/status?token={gui.token}")
        assert code == 200
    finally:
        again.close()
    # One bound elsewhere (--web changed across the restart) is closed, a new one bound.
    elsewhere = socket.socket()
    elsewhere.bind(("127.0.0.1", 0))
    elsewhere.listen()
    port = elsewhere.getsockname()[1]
    moved = WebGui("127.0.0.1", 0, fake.status, fake.handover, sock=elsewhere)
    try:
        assert elsewhere.fileno() == -1 and moved.address[1] not in (0, port)
    finally:
        moved.close()


def test_an_endpoint_in_use_or_malformed_is_one_line(served: tuple[WebGui, Fake]) -> None:
    gui, fake = served
    with pytest.raises(SetupError, match=r"--web 127\.0\.0\.1:\d+: "):
        WebGui(*gui.address, fake.status, fake.handover)
    with pytest.raises(SetupError, match=r"no index\.html"):
        WebGui("127.0.0.1", 0, fake.status, fake.handover, static=Path("/"))
    assert build(web="127.0.0.1:8470").web == ("127.0.0.1", 8470)
    assert build().web is None  # off by default
    with pytest.raises(ConfigError, match="--web"):
        build(web="8470")


async def test_web_url_prints_the_url_or_one_line_when_the_gui_is_off(
    served: tuple[WebGui, Fake], tmp_path: Path
) -> None:
    """`upmt-client web-url` against a control socket answering as the daemon does."""
    gui, _fake = served
    current: list[WebGui | None] = [gui]

    async def daemon(request: JSON) -> JSON:
        assert request == {"cmd": "web-url"}
        return web_url_answer(current[0])

    path = tmp_path / "client.sock"
    sock = bind_control_socket(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, sock, daemon)
        on = await trio.to_thread.run_sync(run, "upmt_client", "web-url", "--control", str(path))
        assert on.code == 0 and on.stdout == gui.url + "\n", on
        current[0] = None
        off = await trio.to_thread.run_sync(run, "upmt_client", "web-url", "--control", str(path))
        assert_one_line_error(off, "upmt-client", "the web GUI is off", "--web")
        nursery.cancel_scope.cancel()
