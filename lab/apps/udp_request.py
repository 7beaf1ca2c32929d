"""A legacy UDP client for the lab: send one datagram, print the replies.

`--expect N` waits for N replies (each within `--timeout`); exits 1 if any
is missing. Prints each reply as `reply <text>`.
"""

import argparse
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("message")
    parser.add_argument("--sport", type=int, default=0)
    parser.add_argument("--expect", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.sport))
    sock.settimeout(args.timeout)
    sock.sendto(args.message.encode(), (args.host, args.port))
    print(f"sent from {sock.getsockname()[0]}:{sock.getsockname()[1]}", flush=True)
    for _ in range(args.expect):
        try:
            data, _addr = sock.recvfrom(65535)
        except TimeoutError:
            print("timeout", flush=True)
            return 1
        print("reply " + data.decode(errors="replace"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
