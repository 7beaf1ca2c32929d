"""UPMT signalling, sans-IO: SIP messages, non-INVITE transactions, UPMT bodies, association.

Nothing here opens a socket or reads a clock: the daemons feed datagrams and
`now` into a `TransactionLayer` and send what it hands back (docs/architecture.md, "Signalling").

* `message`: untrusted parsing over `sipmessage`, builders, serializer;
* `transaction`, `events`: RFC 3261 §17 non-INVITE transactions over UDP;
* `bodies`: the JSON bodies of tunnel setup and handover;
* `register`: REGISTER / 200 OK with `VIpAddr`, and the refresh schedule.
"""
