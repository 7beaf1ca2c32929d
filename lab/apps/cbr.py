"""Constant-bit-rate UDP streams with sequence numbers, to measure loss and gaps.

`serve` runs on the correspondent host: a datagram `START <pps> <count> <size>`
makes it send `count` datagrams of `size` bytes at `pps` packets per second
back to the sender, each carrying a u32 sequence number and the u64 send
time (ns, CLOCK_MONOTONIC: the lab's hosts share one kernel, so one-way
delays are real). `receive` runs on the mobile host as an ordinary
application: it asks for a stream and reports, as one JSON line, what
arrived: received, lost, duplicates, reordered, the largest gap between
consecutive arrivals and the one-way delay percentiles.
"""

import argparse
import json
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("!IQ")


def serve(bind: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    print(f"cbr serving on {bind}:{port}", flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        parts = data.split()
        if len(parts) != 4 or parts[0] != b"START":
            continue
        try:
            pps, count, size = (int(p) for p in parts[1:])
        except ValueError:
            continue
        pps, count, size = max(1, min(pps, 100_000)), min(count, 10_000_000), max(12, size)
        print(f"stream to {addr[0]}:{addr[1]}: {count} x {size} B at {pps}/s", flush=True)
        threading.Thread(target=_stream, args=(sock, addr, pps, count, size), daemon=True).start()


def _stream(sock: socket.socket, addr: tuple[str, int], pps: int, count: int, size: int) -> None:
    padding = bytes(size - HEADER.size)
    start = time.monotonic()
    for seq in range(count):
        due = start + seq / pps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(HEADER.pack(seq, time.monotonic_ns()) + padding, addr)


def receive(
    host: str,
    port: int,
    pps: int,
    count: int,
    size: int,
    sport: int,
    idle: float,
    ready_file: str | None,
) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", sport))
    sock.settimeout(idle)
    sock.sendto(f"START {pps} {count} {size}".encode(), (host, port))
    seen: set[int] = set()
    duplicates = reordered = 0
    highest = -1
    last_arrival: float | None = None
    max_gap = 0.0
    max_gap_after = -1
    delays: list[float] = []
    first_arrival: float | None = None
    while len(seen) < count:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        now = time.monotonic()
        if len(data) < HEADER.size:
            continue
        seq, sent_ns = HEADER.unpack_from(data)
        if first_arrival is None:
            first_arrival = now
            if ready_file:
                with open(ready_file, "w") as f:
                    f.write("streaming\n")
        if seq in seen:
            duplicates += 1
            continue
        seen.add(seq)
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
        if last_arrival is not None and now - last_arrival > max_gap:
            max_gap = now - last_arrival
            max_gap_after = seq
        last_arrival = now
        delays.append(time.monotonic_ns() / 1e9 - sent_ns / 1e9)
    delays.sort()

    def pct(p: float) -> float | None:
        return round(delays[int(p * (len(delays) - 1))] * 1000, 3) if delays else None

    return {
        "expected": count,
        "received": len(seen),
        "lost": count - len(seen),
        "duplicates": duplicates,
        "reordered": reordered,
        "max_gap_ms": round(max_gap * 1000, 3),
        "max_gap_before_seq": max_gap_after,
        "delay_ms_p50": pct(0.5),
        "delay_ms_p99": pct(0.99),
        "delay_ms_max": pct(1.0),
        "duration_s": round((last_arrival or 0) - (first_arrival or 0), 3),
    }


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
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
