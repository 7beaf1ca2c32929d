"""A legacy UDP server for the lab's correspondent host; it knows nothing of UPMT.

Echoes each datagram to its sender and logs the address it came from (so a
test can see what the CH saw: the anchor's NAPT address). A datagram of
the form `LATER <seconds> <text>` is answered at once and once more after
that many seconds, with `<text>`: a downstream-only packet after an idle
period, for NAT pinhole tests.
"""

import argparse
import socket
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port))
    print(f"udp echo listening on {args.bind}:{args.port}", flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        print(f"from {addr[0]}:{addr[1]} {len(data)} bytes", flush=True)
        sock.sendto(data, addr)
        if data.startswith(b"LATER "):
            parts = data.split(b" ", 2)
            try:
                delay = float(parts[1])
            except (IndexError, ValueError):
                continue
            text = parts[2] if len(parts) > 2 else b"later"
            threading.Thread(target=_later, args=(sock, delay, text, addr), daemon=True).start()


def _later(sock: socket.socket, delay: float, text: bytes, addr: tuple[str, int]) -> None:
    time.sleep(delay)
    sock.sendto(text, addr)
    print(f"later to {addr[0]}:{addr[1]} {len(text)} bytes", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
