"""Constant-bit-rate UDP streams with sequence numbers, to measure loss and gaps.

`serve` runs on the correspondent host: a datagram `START <pps> <count> <size>`
makes it send `count` datagrams of `size` bytes at `pps` packets per second
back to the sender, each carrying a u32 sequence number and the u64 send
time (ns, CLOCK_MONOTONIC: the lab's hosts share one kernel, so one-way
delays are real). `receive` runs on the mobile host as an ordinary
application: it asks for a stream and reports, as one JSON line, what
arrived: received, lost, duplicates, reordered, the largest gap between
consecutive arrivals and the one-way delay percentiles.

With `--talk` (`START ... TALK`) the stream goes both ways, as a call does:
the receiver sends the same stream upstream from the same socket, the
server counts what arrives, and once its own stream is sent (and a second
more) it answers `RESULT <json>` with the upstream figures, which the
receiver reports under `"up"`.
"""

import argparse
import contextlib
import json
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("!IQ")
UPSTREAM = 0x80000000  # set in the sequence numbers of the upstream half of a call


class Arrivals:
    """What arrived of one stream: first copies, duplicates, order, gaps, one-way delays."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen: set[int] = set()
        self.duplicates = self.reordered = 0
        self.highest = -1
        self.first: float | None = None
        self.last: float | None = None
        self.max_gap = 0.0
        self.max_gap_before = -1
        self.delays: list[float] = []

    def add(self, seq: int, sent_ns: int, now: float) -> None:
        if self.first is None:
            self.first = now
        if seq in self.seen:
            self.duplicates += 1
            return
        self.seen.add(seq)
        if seq < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, seq)
        if self.last is not None and now - self.last > self.max_gap:
            self.max_gap = now - self.last
            self.max_gap_before = seq
        self.last = now
        self.delays.append(time.monotonic_ns() / 1e9 - sent_ns / 1e9)

    def result(self) -> dict[str, object]:
        delays = sorted(self.delays)

        def pct(p: float) -> float | None:
            return round(delays[int(p * (len(delays) - 1))] * 1000, 3) if delays else None

        return {
            "expected": self.count,
            "received": len(self.seen),
            "lost": self.count - len(self.seen),
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "max_gap_ms": round(self.max_gap * 1000, 3),
            "max_gap_before_seq": self.max_gap_before,
            "delay_ms_p50": pct(0.5),
            "delay_ms_p99": pct(0.99),
            "delay_ms_max": pct(1.0),
            "duration_s": round((self.last or 0) - (self.first or 0), 3),
        }


def serve(bind: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    print(f"cbr serving on {bind}:{port}", flush=True)
    calls: dict[tuple[str, int], Arrivals] = {}
    while True:
        data, addr = sock.recvfrom(2048)
        if len(data) >= HEADER.size and data[0] & 0x80:  # the upstream half of a call
            seq, sent_ns = HEADER.unpack_from(data)
            call = calls.get(addr)
            if call is not None:
                call.add(seq & ~UPSTREAM, sent_ns, time.monotonic())
            continue
        parts = data.split()
        if len(parts) not in (4, 5) or parts[0] != b"START":
            continue
        try:
            pps, count, size = (int(p) for p in parts[1:4])
        except ValueError:
            continue
        pps, count, size = max(1, min(pps, 100_000)), min(count, 10_000_000), max(12, size)
        talk = parts[4:] == [b"TALK"]
        if talk:
            calls[addr] = Arrivals(count)
        print(f"stream to {addr[0]}:{addr[1]}: {count} x {size} B at {pps}/s", flush=True)
        args = (sock, addr, pps, count, size, calls if talk else None)
        threading.Thread(target=_stream, args=args, daemon=True).start()


def _stream(
    sock: socket.socket,
    addr: tuple[str, int],
    pps: int,
    count: int,
    size: int,
    calls: dict[tuple[str, int], Arrivals] | None,
    upstream: bool = False,
) -> None:
    padding = bytes(size - HEADER.size)
    flag = UPSTREAM if upstream else 0
    start = time.monotonic()
    for seq in range(count):
        due = start + seq / pps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        # No route for a moment (the mobile host's interface changing): lost.
        with contextlib.suppress(OSError):
            sock.sendto(HEADER.pack(seq | flag, time.monotonic_ns()) + padding, addr)
    if calls is not None:
        time.sleep(1.0)  # the last upstream packets on their way
        call = calls.pop(addr, None)
        if call is not None:
            sock.sendto(b"RESULT " + json.dumps(call.result()).encode(), addr)


def receive(
    host: str,
    port: int,
    pps: int,
    count: int,
    size: int,
    sport: int,
    idle: float,
    ready_file: str | None,
    talk: bool = False,
) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", sport))
    sock.settimeout(idle)
    sock.sendto(f"START {pps} {count} {size}{' TALK' if talk else ''}".encode(), (host, port))
    if talk:
        args = (sock, (host, port), pps, count, size, None, True)
        threading.Thread(target=_stream, args=args, daemon=True).start()
    down = Arrivals(count)
    up: object = None
    while len(down.seen) < count or (talk and up is None):
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        if data.startswith(b"RESULT "):
            up = json.loads(data[7:])
            continue
        if len(data) < HEADER.size:
            continue
        seq, sent_ns = HEADER.unpack_from(data)
        if down.first is None and ready_file:
            with open(ready_file, "w") as f:
                f.write("streaming\n")
        down.add(seq, sent_ns, time.monotonic())
    result = down.result()
    if talk:
        result["up"] = up
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=3001)
    r = sub.add_parser("receive")
    r.add_argument("host")
    r.add_argument("--port", type=int, default=3001)
    r.add_argument("--pps", type=int, default=1000)
    r.add_argument("--count", type=int, default=5000)
    r.add_argument("--size", type=int, default=200)
    r.add_argument("--sport", type=int, default=0)
    r.add_argument("--idle", type=float, default=5.0, help="give up after this long silent")
    r.add_argument("--ready-file", default=None, help="touched when the first packet arrives")
    r.add_argument("--talk", action="store_true", help="send the same stream upstream too")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.bind, args.port)
        return 0
    result = receive(
        args.host,
        args.port,
        args.pps,
        args.count,
        args.size,
        args.sport,
        args.idle,
        args.ready_file,
        args.talk,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
