"""Non-INVITE transactions with a fake clock: RFC 3261 §17.1.2 / §17.2.2 timers."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from signalling.events import (
    ClientKey,
    RequestReceived,
    ResponseReceived,
    TransactionTerminated,
    TransactionTimedOut,
)
from signalling.message import (
    build_request,
    build_response,
    new_branch,
    parse_message_untrusted,
    serialize,
)
from signalling.transaction import (
    ClientState,
    ClientTransaction,
    ServerState,
    ServerTransaction,
    TransactionLayer,
    TransactionStateError,
)

AN = ("198.51.100.1", 5060)
MH = ("198.18.0.2", 5070)


def make_request(branch: str | None = None, method: str = "MESSAGE") -> Request:
    return build_request(
        method,
        "sip:an@198.51.100.1",
        via_host=MH[0],
        via_port=MH[1],
        branch=branch or new_branch(),
        from_uri="sip:mh-1@198.51.100.1",
        from_tag="ft",
        to_uri="sip:an@198.51.100.1",
        call_id="cid",
        cseq=1,
    )


def reparse_request(request: Request) -> Request:
    parsed = parse_message_untrusted(serialize(request))
    assert isinstance(parsed, Request)
    return parsed


def reparse_response(response: Response) -> Response:
    parsed = parse_message_untrusted(serialize(response))
    assert isinstance(parsed, Response)
    return parsed


def drain(txn: ClientTransaction | ServerTransaction) -> list[object]:
    events: list[object] = []
    while (event := txn.next_event()) is not None:
        events.append(event)
    return events


def state_of(txn: ClientTransaction) -> ClientState:
    """The state, read through a call so that mypy does not keep an earlier narrowing."""
    return txn.state


# --- client -------------------------------------------------------------------


def run_until_quiet(txn: ClientTransaction, until: float) -> list[float]:
    """Drive the timers like a daemon would; return the times of retransmissions."""
    sent: list[float] = []
    while (timer := txn.get_timer()) is not None and timer <= until:
        txn.handle_timer(timer)
        sent += [timer] * len(txn.datagrams_to_send())
    return sent


def test_client_retransmit_schedule_until_timer_f() -> None:
    request = make_request()
    data = serialize(request)
    txn = ClientTransaction(request, data, now=0.0)
    assert txn.datagrams_to_send() == [data]
    sent = run_until_quiet(txn, until=100.0)
    # Intervals 0.5, 1, 2, 4, 4, … (Timer E), then Timer F at 64·T1 = 32 s.
    assert sent == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert txn.state is ClientState.TERMINATED
    assert txn.get_timer() is None
    assert drain(txn) == [TransactionTimedOut(txn.key), TransactionTerminated(txn.key)]


def test_client_proceeding_retransmits_at_t2() -> None:
    request = make_request()
    txn = ClientTransaction(request, serialize(request), now=0.0)
    txn.datagrams_to_send()
    trying = reparse_response(build_response(request, 100))
    txn.receive_response(trying, now=0.2)
    assert txn.state is ClientState.PROCEEDING
    assert drain(txn) == [ResponseReceived(txn.key, trying)]
    sent = run_until_quiet(txn, until=8.0)
    # E was already armed for 0.5; from then on it is T2.
    assert sent == [0.5, 4.5]


def test_client_final_once_then_timer_k() -> None:
    request = make_request()
    txn = ClientTransaction(request, serialize(request), now=0.0)
    ok = reparse_response(build_response(request, 200, to_tag="x"))
    txn.receive_response(ok, now=1.0)
    assert txn.state is ClientState.COMPLETED
    assert drain(txn) == [ResponseReceived(txn.key, ok)]
    # Retransmitted responses are absorbed, and no more requests go out.
    txn.receive_response(ok, now=2.0)
    assert drain(txn) == []
    assert txn.get_timer() == 1.0 + 5.0  # Timer K = T4
    txn.handle_timer(5.9)
    assert txn.state is ClientState.COMPLETED
    txn.handle_timer(6.0)
    assert state_of(txn) is ClientState.TERMINATED
    assert drain(txn) == [TransactionTerminated(txn.key)]
    assert txn.datagrams_to_send() == [serialize(request)]  # only the original send


def test_client_late_wakeup_times_out_without_retransmitting() -> None:
    request = make_request()
    txn = ClientTransaction(request, serialize(request), now=0.0)
    txn.datagrams_to_send()
    txn.handle_timer(100.0)
    assert txn.state is ClientState.TERMINATED
    assert txn.datagrams_to_send() == []


def test_client_table_rejects_input_after_termination() -> None:
    request = make_request()
    txn = ClientTransaction(request, serialize(request), now=0.0)
    txn.handle_timer(32.0)
    assert txn.state is ClientState.TERMINATED
    with pytest.raises(TransactionStateError):
        txn.receive_response(reparse_response(build_response(request, 200)), now=33.0)


def test_client_refuses_invite() -> None:
    request = make_request(method="INVITE")
    with pytest.raises(ValueError):
        ClientTransaction(request, serialize(request), now=0.0)


# --- server -------------------------------------------------------------------


def test_server_absorbs_retransmission_and_resends_same_response() -> None:
    request = reparse_request(make_request())
    txn = ServerTransaction(request, now=0.0)
    # Before any response, a retransmission is discarded (RFC 3261 §17.2.2).
    txn.receive_request(request, now=0.5)
    assert txn.datagrams_to_send() == []
    ok = build_response(request, 200, to_tag="t")
    txn.send_response(ok, now=0.6)
    first = txn.datagrams_to_send()
    assert len(first) == 1
    assert txn.state is ServerState.COMPLETED
    txn.receive_request(request, now=1.5)
    assert txn.datagrams_to_send() == first


def test_server_proceeding_resends_provisional() -> None:
    request = reparse_request(make_request())
    txn = ServerTransaction(request, now=0.0)
    txn.send_response(build_response(request, 100), now=0.1)
    trying = txn.datagrams_to_send()
    assert txn.state is ServerState.PROCEEDING
    txn.receive_request(request, now=0.5)
    assert txn.datagrams_to_send() == trying


def test_server_timer_j_and_second_final_rejected() -> None:
    request = reparse_request(make_request())
    txn = ServerTransaction(request, now=0.0)
    txn.send_response(build_response(request, 200), now=1.0)
    assert txn.get_timer() == 1.0 + 32.0  # Timer J = 64·T1
    with pytest.raises(TransactionStateError):
        txn.send_response(build_response(request, 500), now=2.0)
    txn.handle_timer(33.0)
    assert txn.state is ServerState.TERMINATED
    assert drain(txn) == [TransactionTerminated(txn.key)]
    with pytest.raises(TransactionStateError):
        txn.receive_request(request, now=34.0)


def test_server_abandoned_without_answer() -> None:
    request = reparse_request(make_request())
    txn = ServerTransaction(request, now=0.0)
    txn.handle_timer(32.0)
    assert txn.state is ServerState.TERMINATED
    assert not txn.final_sent


def test_server_unsendable_response_leaves_state() -> None:
    request = reparse_request(make_request())
    txn = ServerTransaction(request, now=0.0)
    with pytest.raises(ValueError):
        txn.send_response(build_response(request, 200, body=b"x" * 9000), now=0.1)
    assert txn.state is ServerState.TRYING


# --- the layer: two of them talking over a fake network ------------------------


def deliver(
    src: TransactionLayer, dst: TransactionLayer, src_addr: tuple[str, int], now: float
) -> int:
    count = 0
    for data, _addr in src.datagrams_to_send():
        dst.receive_datagram(data, src_addr, now)
        count += 1
    return count


def test_layer_request_response_exchange() -> None:
    mh, an = TransactionLayer(), TransactionLayer()
    request = make_request()
    key = mh.send_request(request, AN, now=0.0)
    assert key == ClientKey(request.via[0].parameters["branch"] or "", "MESSAGE")
    assert deliver(mh, an, MH, now=0.0) == 1
    event = an.next_event()
    assert isinstance(event, RequestReceived)
    assert event.addr == MH
    assert an.next_event() is None
    an.send_response(event.key, build_response(event.request, 200, to_tag="a"), now=0.1)
    out = an.datagrams_to_send()
    assert [addr for _, addr in out] == [MH]
    mh.receive_datagram(out[0][0], AN, now=0.1)
    got = mh.next_event()
    assert isinstance(got, ResponseReceived)
    assert got.key == key
    assert got.response.code == 200
    assert mh.statistics().active_client == 1
    mh.handle_timer(5.1)  # Timer K
    assert mh.statistics().active_client == 0
    an.handle_timer(32.1)  # Timer J
    assert an.statistics().active_server == 0


def test_layer_server_absorbs_retransmission() -> None:
    an = TransactionLayer()
    data = serialize(make_request())
    an.receive_datagram(data, MH, now=0.0)
    event = an.next_event()
    assert isinstance(event, RequestReceived)
    an.send_response(event.key, build_response(event.request, 200), now=0.1)
    first = an.datagrams_to_send()
    an.receive_datagram(data, MH, now=0.5)
    assert an.next_event() is None
    assert an.datagrams_to_send() == first
    assert an.statistics().retransmissions_absorbed == 1


def test_layer_retransmitted_request_resent_to_original_address() -> None:
    an = TransactionLayer()
    data = serialize(make_request())
    an.receive_datagram(data, MH, now=0.0)
    event = an.next_event()
    assert isinstance(event, RequestReceived)
    an.send_response(event.key, build_response(event.request, 200), now=0.1)
    an.datagrams_to_send()
    an.receive_datagram(data, ("203.0.113.66", 9999), now=0.5)
    assert [addr for _, addr in an.datagrams_to_send()] == [MH]


def test_layer_client_timeout_event_and_retransmissions() -> None:
    mh = TransactionLayer()
    key = mh.send_request(make_request(), AN, now=0.0)
    mh.datagrams_to_send()
    now = 0.0
    while (timer := mh.get_timer()) is not None:
        now = timer
        mh.handle_timer(now)
    assert now == 32.0
    assert mh.next_event() == TransactionTimedOut(key)
    stats = mh.statistics()
    assert (stats.timeouts, stats.retransmissions_sent, stats.active_client) == (1, 10, 0)
    assert len(mh.datagrams_to_send()) == 10


def test_layer_counts_malformed_and_stray() -> None:
    layer = TransactionLayer()
    layer.receive_datagram(b"garbage", AN, now=0.0)
    stray = build_response(reparse_request(make_request()), 200)
    layer.receive_datagram(serialize(stray), AN, now=0.0)
    stats = layer.statistics()
    assert (stats.received, stats.malformed, stats.stray_responses) == (2, 1, 1)
    assert layer.next_event() is None


def test_layer_cap_refuses_with_503() -> None:
    an = TransactionLayer(max_transactions=2)
    for _ in range(3):
        an.receive_datagram(serialize(make_request()), MH, now=0.0)
    events = [an.next_event(), an.next_event(), an.next_event()]
    assert [type(e) for e in events] == [RequestReceived, RequestReceived, type(None)]
    out = an.datagrams_to_send()
    assert len(out) == 1
    refusal = parse_message_untrusted(out[0][0])
    assert isinstance(refusal, Response)
    assert refusal.code == 503
    assert refusal.headers.get("Retry-After") == "5"
    assert an.statistics().refused == 1


def test_layer_cap_refuses_silently_when_asked() -> None:
    an = TransactionLayer(max_transactions=1, answer_overload=False)
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    assert an.datagrams_to_send() == []
    assert an.statistics().refused == 1


def test_layer_abandoned_server_and_late_response() -> None:
    an = TransactionLayer()
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    event = an.next_event()
    assert isinstance(event, RequestReceived)
    an.handle_timer(32.0)
    an.send_response(event.key, build_response(event.request, 200), now=33.0)
    stats = an.statistics()
    assert (stats.abandoned, stats.responses_dropped, stats.active_server) == (1, 1, 0)
    assert an.datagrams_to_send() == []


def test_layer_drops_invite_and_ack() -> None:
    an = TransactionLayer()
    for method in ("INVITE", "ACK"):
        an.receive_datagram(serialize(make_request(method=method)), MH, now=0.0)
    assert an.next_event() is None
    assert an.statistics().unsupported == 2


def test_layer_duplicate_branch_refused() -> None:
    mh = TransactionLayer()
    branch = new_branch()
    mh.send_request(make_request(branch), AN, now=0.0)
    with pytest.raises(ValueError):
        mh.send_request(make_request(branch), AN, now=0.0)


def test_layer_provisional_then_final_events() -> None:
    mh = TransactionLayer()
    request = make_request()
    key = mh.send_request(request, AN, now=0.0)
    mh.datagrams_to_send()
    mh.receive_datagram(serialize(build_response(request, 100)), AN, now=0.1)
    ok = serialize(build_response(request, 200, to_tag="x"))
    mh.receive_datagram(ok, AN, now=0.2)
    mh.receive_datagram(ok, AN, now=0.3)  # a retransmitted final: absorbed
    codes = []
    while (event := mh.next_event()) is not None:
        assert isinstance(event, ResponseReceived)
        assert event.key == key
        codes.append(event.response.code)
    assert codes == [100, 200]


# --- answers that do not fit, screening, amplification, per-source cap ----------------


def many_vias(count: int, method: str = "REGISTER") -> bytes:
    """A request padded with `count` short compact `v:` headers: a small request, a large answer."""
    vias = "".join(f"v: SIP/2.0/UDP 10.0.0.{i % 250};branch=z9hG4bK{i}\r\n" for i in range(count))
    return (
        f"{method} sip:an SIP/2.0\r\nv: SIP/2.0/UDP mh;branch=z9hG4bKtop\r\n{vias}"
        f"f: <sip:a@an>;tag=1\r\nt: <sip:a@an>\r\ni: c\r\nCSeq: 1 {method}\r\n\r\n"
    ).encode()


def answer_all(an: TransactionLayer) -> None:
    while (event := an.next_event()) is not None:
        assert isinstance(event, RequestReceived)
        an.send_response(event.key, build_response(event.request, 200, body=b"x" * 9000), 0.1)


def test_layer_answer_too_large_becomes_513() -> None:
    an = TransactionLayer()
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    answer_all(an)
    (data, addr), *rest = an.datagrams_to_send()
    assert not rest and addr == MH
    answer = parse_message_untrusted(data)
    assert isinstance(answer, Response) and answer.code == 513
    assert an.statistics().too_large == 1


def test_layer_answer_that_cannot_fit_at_all_is_dropped_not_raised() -> None:
    # Long-form Via in the answer for every compact one in the request: > 8 KB.
    data = many_vias(180)
    assert len(data) < 8192
    an = TransactionLayer()
    an.receive_datagram(data, MH, now=0.0)
    answer_all(an)
    assert an.datagrams_to_send() == []
    stats = an.statistics()
    assert (stats.too_large, stats.unanswerable, stats.active_server) == (1, 1, 1)
    an.handle_timer(32.0)  # abandoned like any unanswered transaction
    assert an.statistics().active_server == 0


def test_screen_answers_statelessly_within_three_times_the_request() -> None:
    seen: list[int] = []

    def screen(request: Request, addr: tuple[str, int], size: int, now: float) -> Response | bool:
        seen.append(size)
        return build_response(request, 401, headers=[("WWW-Authenticate", "x" * 200)])

    an = TransactionLayer(screen=screen)
    data = serialize(make_request(method="REGISTER"))
    an.receive_datagram(data, MH, now=0.0)
    assert seen == [len(data)]
    assert an.next_event() is None  # the TU never saw it as a transaction
    (answer, addr), *rest = an.datagrams_to_send()
    assert not rest and addr == MH and len(answer) <= 3 * len(data)
    stats = an.statistics()
    assert (stats.stateless_answers, stats.active_server) == (1, 0)


def test_screen_answer_over_three_times_the_request_is_not_sent() -> None:
    def screen(request: Request, addr: tuple[str, int], size: int, now: float) -> Response | bool:
        return build_response(request, 401, headers=[("WWW-Authenticate", "x" * 3 * size)])

    an = TransactionLayer(screen=screen)
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    assert an.datagrams_to_send() == []
    assert an.statistics().amplification_dropped == 1


def test_screen_drops_and_admits() -> None:
    verdicts = [False, True]
    an = TransactionLayer(screen=lambda _r, _a, _s, _n: verdicts.pop(0))
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    assert an.next_event() is None
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    assert isinstance(an.next_event(), RequestReceived)
    stats = an.statistics()
    assert (stats.screened_out, stats.active_server) == (1, 1)


def test_per_source_cap_leaves_room_for_other_sources() -> None:
    an = TransactionLayer(max_transactions=100, max_per_source=2)
    for _ in range(3):
        an.receive_datagram(serialize(make_request()), MH, now=0.0)
    an.receive_datagram(serialize(make_request()), ("198.18.9.9", 5060), now=0.0)
    events = []
    while (event := an.next_event()) is not None:
        assert isinstance(event, RequestReceived)
        events.append(event.addr)
    assert events == [MH, MH, ("198.18.9.9", 5060)]
    (refusal, addr), *rest = an.datagrams_to_send()
    assert not rest and addr == MH
    parsed = parse_message_untrusted(refusal)
    assert isinstance(parsed, Response) and parsed.code == 503
    assert an.statistics().refused_per_source == 1
    an.handle_timer(32.0)  # both abandoned: the source's slots come back
    an.receive_datagram(serialize(make_request()), MH, now=33.0)
    assert isinstance(an.next_event(), RequestReceived)


def test_overload_refusal_also_respects_the_amplification_limit() -> None:
    an = TransactionLayer(max_transactions=1)
    an.receive_datagram(serialize(make_request()), MH, now=0.0)
    an.next_event()
    # A tiny request (compact headers) whose 503 with long names and Retry-After is > 3x.
    tiny = (
        b"OPTIONS sip:a SIP/2.0\r\nv:SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"f:<sip:a@b>;tag=1\r\nt:<sip:a@b>\r\ni:1\r\nCSeq:1 OPTIONS\r\n\r\n"
    )
    an.receive_datagram(tiny, MH, now=0.0)
    out = an.datagrams_to_send()
    assert all(len(d) <= 3 * len(tiny) for d, _ in out)
