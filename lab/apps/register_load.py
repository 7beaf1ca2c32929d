"""Many terminals associating at once, for the lab: the REGISTER load of one or several anchors.

Each terminal is its own identity with its own key pair and goes through the
whole association of `signalling.association` (the anchor's stateless 401
with its cookie and key, then the REGISTER with the key exchange, then the
200 OK whose confirmation is checked), from a socket of its own, as the
lab's `rogue` terminal does it (without misbehaving); with `--setup` it then
sets up one tunnel (a signed TunnelSetupRequest inside the tunnel).
Terminal i asks anchor i mod len(anchors); `--workers` run at once. Prints
one JSON object: every terminal's anchor and VIPA (or error), and the rates.

    python -m lab.apps.register_load --anchor 198.51.100.2 --anchor 198.51.100.3 --count 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ground.errors import MalformedError
from lab.apps.rogue import Rogue
from signalling.association import AnchorMismatch

TUNNEL_PORT = 1800


def associate(
    anchor: tuple[str, int], terminal_id: str, encryption: bool, setup: bool
) -> dict[str, Any]:
    """One terminal's association (and tunnel set-up); its VIPA and timings, or the error."""
    out: dict[str, Any] = {"terminal": terminal_id, "anchor": f"{anchor[0]}:{anchor[1]}"}
    started = time.monotonic()
    terminal = Rogue(anchor[0], anchor[1], TUNNEL_PORT, terminal_id, encryption)
    try:
        terminal.register()  # the whole key exchange; retries lost datagrams
        out["vipa"] = terminal.vipa
        out["seconds"] = round(time.monotonic() - started, 4)
        if setup:
            started = time.monotonic()
            answer = terminal.setup(terminal_id, terminal.vipa)
            out["setup"] = answer.code
            out["setup_seconds"] = round(time.monotonic() - started, 4)
    except (SystemExit, AnchorMismatch, MalformedError, OSError) as exc:
        out["error"] = str(exc) or type(exc).__name__
    finally:
        terminal.tunnel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anchor", action="append", required=True, help="ADDR[:PORT] (repeat)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--prefix", default="load", help="terminal ids are PREFIX-N")
    parser.add_argument("--encryption", choices=("on", "off"), default="on")
    parser.add_argument("--setup", action="store_true", help="also set up one tunnel each")
    args = parser.parse_args(argv)
    anchors = []
    for text in args.anchor:
        host, _, port = text.partition(":")
        anchors.append((host, int(port or 5060)))
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(
            pool.map(
                lambda i: associate(
                    anchors[i % len(anchors)],
                    f"{args.prefix}-{i}",
                    args.encryption == "on",
                    args.setup,
                ),
                range(args.count),
            )
        )
    elapsed = time.monotonic() - started
    done = [r for r in results if "vipa" in r and r.get("setup", 200) == 200]
    json.dump(
        {
            "count": args.count,
            "associated": len(done),
            "seconds": round(elapsed, 3),
            "associations_per_s": round(len(done) / elapsed, 1) if elapsed else None,
            "terminals": results,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0 if len(done) == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
