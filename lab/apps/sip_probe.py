"""Send hand-made datagrams to the anchor and report what comes back, by size.

An outsider's view of the anchor's ports: no association, no keys. Each
KIND names a datagram built here:

- `minimal-register`: the smallest REGISTER the grammar allows (compact names);
- `bloated-register`: a ~5 KB REGISTER of short compact `v:` and `m:` headers,
  whose answer would copy them all in long form;
- `bloated-signal`: an ~8 KB non-MESSAGE SIP request in a plaintext SIGNAL
  frame, to the tunnel port.

Prints one JSON line per datagram: its size and the sizes of the replies
received within the timeout.
"""

import argparse
import json
import socket
import sys

from tunnel.frames import FrameType


def minimal_register(host: str) -> bytes:
    return (
        f"REGISTER sip:{host} SIP/2.0\r\n"
        "v:SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        f"f:<sip:t@{host}>;tag=1\r\n"
        f"t:<sip:t@{host}>\r\n"
        "i:1\r\n"
        "CSeq:1 REGISTER\r\n\r\n"
    ).encode()


def bloated_register(host: str) -> bytes:
    vias = "".join(
        f"v:SIP/2.0/UDP 10.0.{i // 250}.{i % 250};branch=z9hG4bK{i}\r\n" for i in range(60)
    )
    contacts = "".join(f"m:<sip:t@10.1.{i // 250}.{i % 250}>\r\n" for i in range(120))
    return (
        f"REGISTER sip:{host} SIP/2.0\r\nv:SIP/2.0/UDP h;branch=z9hG4bKtop\r\n{vias}"
        f"f:<sip:t@{host}>;tag=1\r\nt:<sip:t@{host}>\r\ni:big\r\nCSeq:1 REGISTER\r\n{contacts}\r\n"
    ).encode()


def bloated_signal(host: str) -> bytes:
    vias = "".join(
        f"v:SIP/2.0/UDP 10.0.{i // 250}.{i % 250};branch=z9hG4bK{i}\r\n" for i in range(175)
    )
    sip = (
        f"OPTIONS sip:{host} SIP/2.0\r\nv:SIP/2.0/UDP h;branch=z9hG4bKtop\r\n{vias}"
        f"f:<sip:t@{host}>;tag=1\r\nt:<sip:t@{host}>\r\ni:big\r\nCSeq:1 OPTIONS\r\n\r\n"
    ).encode()
    return bytes((FrameType.SIGNAL,)) + sip


KINDS = {
    "minimal-register": minimal_register,
    "bloated-register": bloated_register,
    "bloated-signal": bloated_signal,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("kinds", nargs="+", choices=sorted(KINDS))
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    for kind in args.kinds:
        datagram = KINDS[kind](args.host)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(args.timeout)
        sock.sendto(datagram, (args.host, args.port))
        replies: list[int] = []
        while True:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            replies.append(len(data))
        print(json.dumps({"kind": kind, "sent": len(datagram), "replies": replies}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
