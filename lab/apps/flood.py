"""Send random and mutated datagrams to the anchor's ports from many source ports.

Used by the bad-input tests (and, later, load tests). Bounded: it sends
exactly `--count` datagrams per port and stops. Half are random bytes, half
are mutations of well-formed SIP and tunnel frames, so that parsing gets
past the first byte.
"""

import argparse
import random
import socket
import sys

SEEDS = [
    b"REGISTER sip:198.51.100.2 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKx\r\n"
    b"From: <sip:x@a>;tag=1\r\nTo: <sip:x@a>\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"\x01MESSAGE sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h:1;branch=z9hG4bKy\r\nFrom: <sip:x@a>;tag=1"
    b"\r\nTo: <sip:x@a>\r\nCall-ID: c2\r\nCSeq: 1 MESSAGE\r\nContent-Type: application/json\r\n"
    b'Content-Length: 30\r\n\r\n{"mType": "HandoverRequest"}',
    b"\x02" + bytes(18),
    b"\x03" + bytes(25),
    b"\x45\x00\x00\x1c" + bytes(24),
    b"\x04\x45" + bytes(30),
]


def datagram(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(0, 1400))
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op < 0.7:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("ports", type=int, nargs="+")
    parser.add_argument("--count", type=int, default=5000, help="datagrams per port")
    parser.add_argument("--sources", type=int, default=64, help="distinct source ports")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    socks = []
    for _ in range(args.sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        s.setblocking(False)
        socks.append(s)
    sent = 0
    for port in args.ports:
        for i in range(args.count):
            try:
                socks[i % len(socks)].sendto(datagram(rng), (args.host, port))
                sent += 1
            except OSError:
                pass  # a full send buffer: the datagram is simply not sent
    print(f"sent {sent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
