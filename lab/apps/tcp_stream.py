"""A legacy TCP file transfer for the lab: it knows nothing of UPMT.

`recv` (on the CH) accepts one connection, writes what it receives to a
file and prints its size and SHA-256; `send` (on the MH) connects and sends
a file with sendfile(2), then waits for the receiver to close. Together
they move a large upload through whatever path the MH routes to the CH.
"""

import argparse
import hashlib
import socket
from pathlib import Path


def receive(bind: str, port: int, out: Path, ready: Path | None) -> None:
    with socket.create_server((bind, port)) as server:
        if ready is not None:
            ready.write_text("ready\n")
        conn, addr = server.accept()
        digest = hashlib.sha256()
        size = 0
        with conn, open(out, "wb") as f:
            while chunk := conn.recv(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    print(f"from {addr[0]}:{addr[1]} {size} bytes sha256 {digest.hexdigest()}", flush=True)


def send(host: str, port: int, path: Path) -> None:
    with socket.create_connection((host, port), timeout=60) as conn, open(path, "rb") as f:
        conn.sendfile(f)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", default="0.0.0.0")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--ready", type=Path)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("file", type=Path)
    args = parser.parse_args()
    if args.cmd == "recv":
        receive(args.bind, args.port, args.out, args.ready)
    else:
        send(args.host, args.port, args.file)


if __name__ == "__main__":
    main()
