"""A delay line for the lab: holds every packet routed through a TUN, then gives it back.

The kernels here have no `netem`, so a NAT namespace delays an access
network's packets with this relay (`lab.topology.Lab.impair`): its policy
routing sends what crosses the NAT (each way) into the TUN `--dev`; the
relay keeps each packet for `--delay-ms` plus a uniform jitter of up to
`--jitter-ms` either way, and writes it back, where the kernel forwards it
on. As with netem, a jitter larger than the spacing of packets reorders
them. At most `--limit` packets wait at once (the rest are dropped, a
full queue), so a flood cannot grow it without bound.
"""

import argparse
import contextlib
import heapq
import os
import random
import select
import signal
import sys
import time

from upmt.tun import open_tun

ADDRESS = "169.254.77.1"  # the TUN needs no address; one keeps tools quiet


def run(dev: str, delay: float, jitter: float, limit: int, seed: int | None) -> None:
    tun = open_tun(dev, address=ADDRESS, prefixlen=32, mtu=1500)
    rng = random.Random(seed)
    queue: list[tuple[float, int, bytes]] = []
    order = 0
    poll = select.poll()
    poll.register(tun.fd, select.POLLIN)
    print(f"delay line on {dev}: {delay * 1000:g} ms +- {jitter * 1000:g} ms", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _due, _n, packet = heapq.heappop(queue)
            with contextlib.suppress(OSError):  # refused (no route now): lost, as on a wire
                os.write(tun.fd, packet)
        timeout = None if not queue else max(0, int((queue[0][0] - now) * 1000) + 1)
        if not poll.poll(timeout):
            continue
        now = time.monotonic()
        while True:
            try:
                packet = os.read(tun.fd, 65535)
            except BlockingIOError:
                break
            if len(queue) >= limit:
                continue
            held = max(0.0, delay + rng.uniform(-jitter, jitter))
            order += 1
            heapq.heappush(queue, (now + held, order, packet))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(args.dev, args.delay_ms / 1000, args.jitter_ms / 1000, args.limit, args.seed)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
