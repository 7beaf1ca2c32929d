"""Non-INVITE SIP transactions over UDP (RFC 3261 §17.1.2, §17.2.2), sans-IO.

Theory of operation. A transaction is a request, its retransmissions and its
responses. Over UDP the client retransmits the request (Timer E: T1, doubling
up to T2; T2 once a provisional arrived) until a final response arrives or
Timer F (64·T1) gives up; after the final response it lingers T4 (Timer K) to
absorb retransmitted responses. The server passes the request up once,
absorbs retransmissions of it by re-sending its last response, and lingers
64·T1 (Timer J) after the final response.

Each state machine is one table `{state: {input: (next state, action)}}`:
an input with no entry (a second final response from the TU, a timer of a
terminated transaction) raises `TransactionStateError`, because it is a bug in
the caller, not something to ignore. Inputs come from the network
(responses, retransmitted requests), from the transaction user (responses to
send) and from timers; time is always passed in as `now` (seconds, any
monotonic origin), and timers are absolute times.

`TransactionLayer` holds many transactions, matches datagrams to them
(§17.1.3, §17.2.3), drops and counts what is malformed or stray, and is the
only object a daemon drives: `receive_datagram`, `send_request`,
`send_response`, `datagrams_to_send`, `get_timer`, `handle_timer`,
`next_event`.

A server facing the Internet must not spend state on, nor answer at length
to, a source address that has not shown it can receive: a `screen` sees
every new request before a transaction exists and may answer it statelessly
(a challenge carrying a cookie, say) or drop it; a stateless answer larger
than `AMPLIFICATION_LIMIT` times the request is dropped (the anti-
amplification rule of RFC 9000 §8.1). No answer ever raises: one that does
not serialize (too large for a datagram) becomes a `513 Message Too Large`,
or, when even that does not fit, is dropped and counted.

INVITE is not implemented (UPMT uses REGISTER, MESSAGE and OPTIONS): INVITE
and ACK requests are dropped and counted as unsupported.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Final, TypeAlias

from sipmessage import Request, Response

from ground.errors import MalformedError, UpmtError

from .events import (
    Addr,
    ClientKey,
    Event,
    RequestReceived,
    ResponseReceived,
    ServerKey,
    TransactionKey,
    TransactionTerminated,
    TransactionTimedOut,
)
from .message import (
    MessageTooLarge,
    build_response,
    parse_message_untrusted,
    serialize,
    top_branch,
)

__all__ = [
    "AMPLIFICATION_LIMIT",
    "T1",
    "T2",
    "T4",
    "ClientInput",
    "ClientState",
    "ClientTransaction",
    "Screen",
    "ServerInput",
    "ServerState",
    "ServerTransaction",
    "TransactionLayer",
    "TransactionStateError",
    "TransactionStatistics",
    "client_key_of",
    "server_key_of",
]

T1: Final = 0.5  # RFC 3261 §17.1.1.1, table 4: RTT estimate
T2: Final = 4.0  # RFC 3261 §17.1.2.2, table 4: maximum retransmit interval
T4: Final = 5.0  # RFC 3261 §17.1.2.2, table 4: maximum time a message lives in the network
# RFC 3261 §17.1.2.2 (Timer F) and §17.2.2 (Timer J): 64·T1 over UDP.
TIMEOUT_FACTOR: Final = 64

# Seconds a refused requester is asked to wait (RFC 3261 §20.33, Retry-After).
OVERLOAD_RETRY_AFTER: Final = 5

# RFC 9000 §8.1: before a peer's address is validated, send it at most three
# times the bytes received from it. Applied to every stateless answer.
AMPLIFICATION_LIMIT: Final = 3

# A new request, its source, its size in bytes and the time -> True: open a
# server transaction (the TU answers it); False: drop it; a Response: send
# that statelessly (no transaction), within AMPLIFICATION_LIMIT.
Screen: TypeAlias = "Callable[[Request, Addr, int, float], Response | bool]"


class TransactionStateError(UpmtError):
    """An input that the transaction's state does not accept (a caller bug)."""


def client_key_of(message: Request | Response) -> ClientKey:
    """RFC 3261 §17.1.3: a response matches the client transaction of its branch and CSeq method.

    `message` must come from `parse_message_untrusted` or the builders.
    """
    return ClientKey(top_branch(message), message.cseq.method)


def server_key_of(request: Request) -> ServerKey:
    """RFC 3261 §17.2.3: branch, sent-by (host compared case-insensitively) and method.

    ACK would match INVITE's transaction; neither is handled here.
    """
    top = request.via[0]
    return ServerKey(top_branch(request), top.host.lower(), top.port, request.method)


# --- client -------------------------------------------------------------------


class ClientState(Enum):
    """RFC 3261 figure 6."""

    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


class ClientInput(Enum):
    PROVISIONAL = auto()  # a 1xx from the network
    FINAL = auto()  # a 2xx..6xx from the network
    TIMER_E = auto()  # retransmit the request
    TIMER_F = auto()  # transaction timeout
    TIMER_K = auto()  # end of the wait for retransmitted responses


_ClientAction: TypeAlias = Callable[["ClientTransaction", Response | None, float], None]

# When two timers are due in one `handle_timer` call, the one that ends the
# transaction goes first, so a late wake-up does not retransmit after timeout.
_CLIENT_TIMER_PRIORITY: Final = (ClientInput.TIMER_F, ClientInput.TIMER_K, ClientInput.TIMER_E)


class _Outputs:
    """What both kinds of transaction hand out: datagrams, the next timer, events."""

    _PRIORITY: tuple[Any, ...]  # when two timers are due, the one that ends it goes first
    _timers: dict[Any, float]
    _datagrams: list[bytes]
    _events: deque[Event]

    def datagrams_to_send(self) -> list[bytes]:
        out, self._datagrams = self._datagrams, []
        return out

    def get_timer(self) -> float | None:
        """The absolute time of the next timer, None once terminated."""
        return min(self._timers.values(), default=None)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at `now`; calling early is harmless."""
        while not self.terminated:
            due = next((t for t in self._PRIORITY if self._timers.get(t, now + 1) <= now), None)
            if due is None:
                return
            del self._timers[due]
            self._fire(due, None, now)

    @property
    def terminated(self) -> bool:
        raise NotImplementedError

    def _fire(self, kind: Any, response: Response | None, now: float) -> None:
        raise NotImplementedError


class ClientTransaction(_Outputs):
    """One non-INVITE client transaction over UDP (RFC 3261 §17.1.2)."""

    _PRIORITY = _CLIENT_TIMER_PRIORITY

    def __init__(
        self,
        request: Request,
        data: bytes,
        now: float,
        t1: float = T1,
        t2: float = T2,
        t4: float = T4,
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"{request.method} needs an INVITE transaction")
        self.request: Final = request
        self.key: Final = ClientKey(top_branch(request), request.method)
        self.state = ClientState.TRYING
        self.retransmissions = 0
        self._data = data
        self._t2 = t2
        self._t4 = t4
        self._interval = t1
        self._timers: dict[ClientInput, float] = {
            ClientInput.TIMER_E: now + t1,
            ClientInput.TIMER_F: now + TIMEOUT_FACTOR * t1,
        }
        self._datagrams: list[bytes] = [data]
        self._events: deque[Event] = deque()

    # Inputs.

    def receive_response(self, response: Response, now: float) -> None:
        """A response routed to this transaction by the caller (see `client_key_of`)."""
        kind = ClientInput.PROVISIONAL if response.code < 200 else ClientInput.FINAL
        self._fire(kind, response, now)

    @property
    def terminated(self) -> bool:
        return self.state is ClientState.TERMINATED

    # The machine.

    def _fire(self, kind: ClientInput, response: Response | None, now: float) -> None:
        entry = _CLIENT_TRANSITIONS[self.state].get(kind)
        if entry is None:
            raise TransactionStateError(f"client transaction: {kind.name} in {self.state.name}")
        next_state, action = entry
        self.state = next_state
        action(self, response, now)

    def _pass_up(self, response: Response | None, now: float) -> None:
        assert response is not None
        self._events.append(ResponseReceived(self.key, response))

    def _complete(self, response: Response | None, now: float) -> None:
        # RFC 3261 §17.1.2.2: entering Completed stops E and F and starts K.
        self._pass_up(response, now)
        self._timers = {ClientInput.TIMER_K: now + self._t4}

    def _retransmit(self, response: Response | None, now: float) -> None:
        self._datagrams.append(self._data)
        self.retransmissions += 1
        if self.state is ClientState.PROCEEDING:
            self._interval = self._t2
        else:
            self._interval = min(2 * self._interval, self._t2)
        self._timers[ClientInput.TIMER_E] = now + self._interval

    def _absorb(self, response: Response | None, now: float) -> None:
        """A retransmitted response in Completed: the TU already has the final one."""

    def _time_out(self, response: Response | None, now: float) -> None:
        self._events.append(TransactionTimedOut(self.key))
        self._terminate(response, now)

    def _terminate(self, response: Response | None, now: float) -> None:
        self._timers = {}
        self._events.append(TransactionTerminated(self.key))


_ClientTable: TypeAlias = dict[ClientState, dict[ClientInput, tuple[ClientState, _ClientAction]]]

_CLIENT_TRANSITIONS: Final[_ClientTable] = {
    ClientState.TRYING: {
        ClientInput.PROVISIONAL: (ClientState.PROCEEDING, ClientTransaction._pass_up),
        ClientInput.FINAL: (ClientState.COMPLETED, ClientTransaction._complete),
        ClientInput.TIMER_E: (ClientState.TRYING, ClientTransaction._retransmit),
        ClientInput.TIMER_F: (ClientState.TERMINATED, ClientTransaction._time_out),
    },
    ClientState.PROCEEDING: {
        ClientInput.PROVISIONAL: (ClientState.PROCEEDING, ClientTransaction._pass_up),
        ClientInput.FINAL: (ClientState.COMPLETED, ClientTransaction._complete),
        ClientInput.TIMER_E: (ClientState.PROCEEDING, ClientTransaction._retransmit),
        ClientInput.TIMER_F: (ClientState.TERMINATED, ClientTransaction._time_out),
    },
    ClientState.COMPLETED: {
        ClientInput.PROVISIONAL: (ClientState.COMPLETED, ClientTransaction._absorb),
        ClientInput.FINAL: (ClientState.COMPLETED, ClientTransaction._absorb),
        ClientInput.TIMER_K: (ClientState.TERMINATED, ClientTransaction._terminate),
    },
    ClientState.TERMINATED: {},
}


# --- server -------------------------------------------------------------------


class ServerState(Enum):
    """RFC 3261 figure 8."""

    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


class ServerInput(Enum):
    REQUEST = auto()  # a retransmission of the request from the network
    PROVISIONAL = auto()  # the TU sends a 1xx
    FINAL = auto()  # the TU sends a 2xx..6xx
    TIMER_J = auto()  # end of the wait for retransmitted requests
    # Not in RFC 3261: a TU that never answers would otherwise keep the
    # transaction (and its slot under the layer's cap) forever. After 64·T1 the
    # client's Timer F has fired, so no answer could still be of use.
    TIMER_ABANDON = auto()


_SERVER_TIMER_PRIORITY: Final = (ServerInput.TIMER_J, ServerInput.TIMER_ABANDON)


class ServerTransaction(_Outputs):
    """One non-INVITE server transaction over UDP (RFC 3261 §17.2.2)."""

    _PRIORITY = _SERVER_TIMER_PRIORITY

    def __init__(self, request: Request, now: float, t1: float = T1) -> None:
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"{request.method} needs an INVITE transaction")
        self.request: Final = request
        self.key: Final = server_key_of(request)
        self.state = ServerState.TRYING
        self.final_sent = False
        self._timeout = TIMEOUT_FACTOR * t1
        self._last_response: bytes | None = None
        self._timers: dict[ServerInput, float] = {ServerInput.TIMER_ABANDON: now + self._timeout}
        self._datagrams: list[bytes] = []
        self._events: deque[Event] = deque()

    # Inputs.

    def receive_request(self, request: Request, now: float) -> None:
        """A retransmission of the request (the caller matched it, see `server_key_of`)."""
        self._fire(ServerInput.REQUEST, None, now)

    def send_response(self, response: Response, now: float) -> None:
        """The TU's response; raises `TransactionStateError` after a final one."""
        kind = ServerInput.PROVISIONAL if response.code < 200 else ServerInput.FINAL
        self._fire(kind, response, now)

    @property
    def terminated(self) -> bool:
        return self.state is ServerState.TERMINATED

    # The machine.

    def _fire(self, kind: ServerInput, response: Response | None, now: float) -> None:
        entry = _SERVER_TRANSITIONS[self.state].get(kind)
        if entry is None:
            raise TransactionStateError(f"server transaction: {kind.name} in {self.state.name}")
        next_state, action = entry
        # Serialize before changing state, so a response that cannot be sent
        # (too large, header injection) leaves the transaction as it was.
        data = serialize(response) if response is not None else None
        self.state = next_state
        action(self, data, now)

    def _send(self, data: bytes | None, now: float) -> None:
        assert data is not None
        self._last_response = data
        self._datagrams.append(data)

    def _send_final(self, data: bytes | None, now: float) -> None:
        # RFC 3261 §17.2.2: entering Completed starts Timer J.
        self._send(data, now)
        self.final_sent = True
        self._timers = {ServerInput.TIMER_J: now + self._timeout}

    def _absorb(self, data: bytes | None, now: float) -> None:
        """A retransmission before any response: RFC 3261 §17.2.2 discards it."""

    def _resend(self, data: bytes | None, now: float) -> None:
        assert self._last_response is not None
        self._datagrams.append(self._last_response)

    def _terminate(self, data: bytes | None, now: float) -> None:
        self._timers = {}
        self._events.append(TransactionTerminated(self.key))


_ServerAction: TypeAlias = Callable[["ServerTransaction", bytes | None, float], None]

_ServerTable: TypeAlias = dict[ServerState, dict[ServerInput, tuple[ServerState, _ServerAction]]]

_SERVER_TRANSITIONS: Final[_ServerTable] = {
    ServerState.TRYING: {
        ServerInput.REQUEST: (ServerState.TRYING, ServerTransaction._absorb),
        ServerInput.PROVISIONAL: (ServerState.PROCEEDING, ServerTransaction._send),
        ServerInput.FINAL: (ServerState.COMPLETED, ServerTransaction._send_final),
        ServerInput.TIMER_ABANDON: (ServerState.TERMINATED, ServerTransaction._terminate),
    },
    ServerState.PROCEEDING: {
        ServerInput.REQUEST: (ServerState.PROCEEDING, ServerTransaction._resend),
        ServerInput.PROVISIONAL: (ServerState.PROCEEDING, ServerTransaction._send),
        ServerInput.FINAL: (ServerState.COMPLETED, ServerTransaction._send_final),
        ServerInput.TIMER_ABANDON: (ServerState.TERMINATED, ServerTransaction._terminate),
    },
    ServerState.COMPLETED: {
        ServerInput.REQUEST: (ServerState.COMPLETED, ServerTransaction._resend),
        ServerInput.TIMER_J: (ServerState.TERMINATED, ServerTransaction._terminate),
    },
    ServerState.TERMINATED: {},
}


# --- the layer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransactionStatistics:
    """Counters since the layer was created; `active_*` are current sizes."""

    received: int  # datagrams given to receive_datagram
    malformed: int  # dropped: did not parse
    stray_responses: int  # dropped: no client transaction matches
    retransmissions_absorbed: int  # requests matched to an existing server transaction
    retransmissions_sent: int  # client requests re-sent by Timer E
    refused: int  # new requests over the cap (answered 503 unless disabled)
    refused_per_source: int  # new requests over the cap of one source address
    unsupported: int  # dropped: INVITE or ACK
    screened_out: int  # new requests the screen dropped
    stateless_answers: int  # answers the screen gave without a transaction
    amplification_dropped: int  # stateless answers over AMPLIFICATION_LIMIT, not sent
    too_large: int  # answers that did not serialize (513 or 500 sent instead, if that fit)
    unanswerable: int  # ... of which even the 513/500 did not fit: nothing sent
    responses_dropped: int  # send_response for a transaction already gone
    timeouts: int  # client transactions ended by Timer F
    abandoned: int  # server transactions the TU never answered
    active_client: int
    active_server: int


@dataclass(slots=True)
class _Client:
    txn: ClientTransaction
    addr: Addr
    scheduled: float | None = None  # the deadline last put on the timer heap


@dataclass(slots=True)
class _Server:
    txn: ServerTransaction
    addr: Addr
    scheduled: float | None = None


class TransactionLayer:
    """All transactions of one SIP endpoint over UDP; the object a daemon drives.

    Nothing from the network raises: malformed datagrams, stray responses and
    requests over `max_transactions` (or over `max_per_source` from one source
    address) are counted (see `statistics`) and dropped; a refused request is
    answered `503 Service Unavailable` with `Retry-After` when
    `answer_overload` is true, statelessly, so the refusal itself costs no
    state. `screen` (see `Screen`) decides about each new request first.
    """

    def __init__(
        self,
        *,
        max_transactions: int = 1000,
        max_per_source: int | None = None,
        answer_overload: bool = True,
        screen: Screen | None = None,
        t1: float = T1,
        t2: float = T2,
        t4: float = T4,
    ) -> None:
        if max_transactions < 1:
            raise ValueError("max_transactions must be at least 1")
        if max_per_source is not None and max_per_source < 1:
            raise ValueError("max_per_source must be at least 1")
        self._max = max_transactions
        self._max_per_source = max_per_source
        self._per_source: dict[str, int] = {}
        self._screen = screen
        self._answer_overload = answer_overload
        self._t1, self._t2, self._t4 = t1, t2, t4
        self._clients: dict[ClientKey, _Client] = {}
        self._servers: dict[ServerKey, _Server] = {}
        # Every timer a transaction has set, as (deadline, order, key). Entries
        # go stale when the transaction moves on or ends; they are skipped when
        # they reach the top. A heap, because a registrar holds thousands of
        # transactions for Timer J and looks for the next timer per datagram.
        self._timers: list[tuple[float, int, TransactionKey]] = []
        self._timer_order = 0
        self._datagrams: list[tuple[bytes, Addr]] = []
        self._events: deque[Event] = deque()
        self._received = 0
        self._malformed = 0
        self._stray = 0
        self._absorbed = 0
        self._retransmitted = 0
        self._refused = 0
        self._refused_per_source = 0
        self._unsupported = 0
        self._screened_out = 0
        self._stateless = 0
        self._amplification_dropped = 0
        self._too_large = 0
        self._unanswerable = 0
        self._responses_dropped = 0
        self._timeouts = 0
        self._abandoned = 0

    # Network input.

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed one received datagram; never raises for any content of `data`."""
        self._received += 1
        try:
            message = parse_message_untrusted(data)
        except MalformedError:
            self._malformed += 1
            return
        if isinstance(message, Response):
            self._receive_response(message, now)
        else:
            self._receive_request(message, addr, now, len(data))

    def _receive_response(self, response: Response, now: float) -> None:
        client = self._clients.get(client_key_of(response))
        if client is None:
            self._stray += 1
            return
        client.txn.receive_response(response, now)
        self._pump_client(client)

    def _receive_request(self, request: Request, addr: Addr, now: float, size: int) -> None:
        if request.method in ("INVITE", "ACK"):
            self._unsupported += 1
            return
        key = server_key_of(request)
        server = self._servers.get(key)
        if server is not None:
            self._absorbed += 1
            server.txn.receive_request(request, now)
            self._pump_server(server)
            return
        if self._screen is not None:
            verdict = self._screen(request, addr, size, now)
            if verdict is False:
                self._screened_out += 1
                return
            if verdict is not True:
                self._send_stateless(verdict, addr, size)
                return
        source = addr[0]
        limit = self._max_per_source
        if limit is not None and self._per_source.get(source, 0) >= limit:
            self._refused_per_source += 1
            self._refuse(request, addr, size)
            return
        if len(self._servers) >= self._max:
            self._refused += 1
            self._refuse(request, addr, size)
            return
        server = _Server(ServerTransaction(request, now, self._t1), addr)
        self._servers[key] = server
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._schedule(server, key)
        self._events.append(RequestReceived(key, request, addr))

    def _refuse(self, request: Request, addr: Addr, size: int) -> None:
        if self._answer_overload:
            refusal = build_response(
                request, 503, headers=[("Retry-After", str(OVERLOAD_RETRY_AFTER))]
            )
            self._send_stateless(refusal, addr, size)

    def _send_stateless(self, response: Response, addr: Addr, size: int) -> None:
        """An answer without a transaction: only if it serializes and stays within the limit."""
        try:
            data = serialize(response)
        except ValueError:
            self._too_large += 1
            self._unanswerable += 1
            return
        if len(data) > AMPLIFICATION_LIMIT * size:
            self._amplification_dropped += 1
            return
        self._stateless += 1
        self._datagrams.append((data, addr))

    # Transaction-user input.

    def send_request(self, request: Request, addr: Addr, now: float) -> ClientKey:
        """Start a client transaction; its events carry the returned key.

        Raises `ValueError` if a transaction with the same branch and method is
        still active (every request needs a fresh branch, `new_branch`), and
        `MessageTooLarge` if the request does not fit in a datagram: the caller
        built it and must make it smaller (split it).
        """
        key = client_key_of(request)
        if key in self._clients:
            raise ValueError(f"a transaction with branch {key.branch} is active")
        txn = ClientTransaction(request, serialize(request), now, self._t1, self._t2, self._t4)
        client = _Client(txn, addr)
        self._clients[key] = client
        self._pump_client(client)
        return key

    def send_response(self, key: ServerKey, response: Response, now: float) -> None:
        """Answer the request of `key` (from `RequestReceived`).

        If the transaction is gone (abandoned after 64·T1) the response is
        counted and dropped: the requester has given up by then. A response that
        does not serialize (too large for a datagram, or a header the TU filled
        with a control character) is replaced by a bare `513 Message Too Large`
        (or `500`), which copies only what RFC 3261 §8.2.6 requires; when even
        that does not fit (a request made of hundreds of Via headers) nothing is
        sent and the transaction is left to be abandoned. A second final
        response raises `TransactionStateError`.
        """
        server = self._servers.get(key)
        if server is None:
            self._responses_dropped += 1
            return
        try:
            server.txn.send_response(response, now)
        except ValueError as exc:  # the transaction's state is unchanged
            self._too_large += 1
            code = 513 if isinstance(exc, MessageTooLarge) else 500
            try:
                server.txn.send_response(build_response(server.txn.request, code), now)
            except ValueError:
                self._unanswerable += 1
        self._pump_server(server)

    # Timers.

    def get_timer(self) -> float | None:
        """The absolute time of the earliest timer of any transaction."""
        timers = self._timers
        while timers:
            deadline, _order, key = timers[0]
            if self._current_timer(key) == deadline:
                return deadline
            heapq.heappop(timers)  # stale: the transaction moved on or ended
        return None

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _order, key = heapq.heappop(timers)
            if self._current_timer(key) != deadline:
                continue
            if isinstance(key, ClientKey):
                client = self._clients[key]
                client.txn.handle_timer(now)
                self._pump_client(client, retransmission=True)
            else:
                server = self._servers[key]
                server.txn.handle_timer(now)
                self._pump_server(server)

    def _current_timer(self, key: TransactionKey) -> float | None:
        if isinstance(key, ClientKey):
            client = self._clients.get(key)
            return client.txn.get_timer() if client is not None else None
        server = self._servers.get(key)
        return server.txn.get_timer() if server is not None else None

    def _schedule(self, holder: _Client | _Server, key: TransactionKey) -> None:
        deadline = holder.txn.get_timer()
        if deadline is not None and deadline != holder.scheduled:
            holder.scheduled = deadline
            self._timer_order += 1
            heapq.heappush(self._timers, (deadline, self._timer_order, key))

    # Outputs.

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> Event | None:
        """RequestReceived, ResponseReceived or TransactionTimedOut; None when drained."""
        return self._events.popleft() if self._events else None

    def statistics(self) -> TransactionStatistics:
        return TransactionStatistics(
            received=self._received,
            malformed=self._malformed,
            stray_responses=self._stray,
            retransmissions_absorbed=self._absorbed,
            retransmissions_sent=self._retransmitted,
            refused=self._refused,
            refused_per_source=self._refused_per_source,
            unsupported=self._unsupported,
            screened_out=self._screened_out,
            stateless_answers=self._stateless,
            amplification_dropped=self._amplification_dropped,
            too_large=self._too_large,
            unanswerable=self._unanswerable,
            responses_dropped=self._responses_dropped,
            timeouts=self._timeouts,
            abandoned=self._abandoned,
            active_client=len(self._clients),
            active_server=len(self._servers),
        )

    def _pump_client(self, client: _Client, *, retransmission: bool = False) -> None:
        datagrams = client.txn.datagrams_to_send()
        if retransmission:
            self._retransmitted += len(datagrams)
        self._datagrams.extend((data, client.addr) for data in datagrams)
        while (event := client.txn.next_event()) is not None:
            if isinstance(event, TransactionTerminated):
                del self._clients[client.txn.key]
                continue
            if isinstance(event, TransactionTimedOut):
                self._timeouts += 1
            self._events.append(event)
        if client.txn.key in self._clients:
            self._schedule(client, client.txn.key)

    def _pump_server(self, server: _Server) -> None:
        # Responses, also re-sent ones, go to the address the request first came
        # from: answering a spoofed retransmission's source would let anyone who
        # guesses a branch redirect or reflect the response.
        self._datagrams.extend((data, server.addr) for data in server.txn.datagrams_to_send())
        while (event := server.txn.next_event()) is not None:
            if isinstance(event, TransactionTerminated):
                if not server.txn.final_sent:
                    self._abandoned += 1
                del self._servers[server.txn.key]
                source = server.addr[0]
                left = self._per_source.get(source, 1) - 1
                if left > 0:
                    self._per_source[source] = left
                else:
                    self._per_source.pop(source, None)
        if server.txn.key in self._servers:
            self._schedule(server, server.txn.key)
