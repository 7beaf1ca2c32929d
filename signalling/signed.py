"""The signed MESSAGE a terminal sends inside a tunnel: a UPMT JSON body, its own transaction.

Every TunnelSetupRequest and HandoverRequest travels as a dialog-less
MESSAGE (RFC 3428) from the terminal's address of record to the anchor,
signed with the association's key (`signalling.tunnelauth.sign`). The
client, the lab's test programs and the benchmarks build it here.
"""

from __future__ import annotations

from sipmessage import Request

from ground.constants import JSON_TYPE, Addr
from signalling.message import build_request, new_branch, new_call_id, new_tag
from signalling.tunnelauth import sign

__all__ = ["signed_message"]


def signed_message(
    *,
    terminal_id: str,
    anchor: str,
    local: Addr,
    body: bytes,
    key: bytes,
    seq: int,
    now: float,
    call_id: str | None = None,
) -> Request:
    """A MESSAGE from `sip:<terminal_id>@<anchor>` carrying `body`, signed with `key`.

    `local` is the tunnel socket's address (the Via); `seq` must grow with
    every message signed under `key` (the anchor refuses replays), `now` is
    the wall clock the signature carries.
    """
    aor = f"sip:{terminal_id}@{anchor}"
    request = build_request(
        "MESSAGE",
        f"sip:{anchor}",
        via_host=local[0],
        via_port=local[1],
        branch=new_branch(),
        from_uri=aor,
        from_tag=new_tag(),
        to_uri=aor,
        call_id=call_id or new_call_id(),
        cseq=1,
        body=body,
        content_type=JSON_TYPE,
    )
    sign(request, key, now=now, seq=seq)
    return request
