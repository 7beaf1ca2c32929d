"""The anchor's persistent state: leases, pinned keys, registrations, tunnel records.

`api` defines the `Store` interface; `sqlite` is the embedded default and
`postgres` the store several anchors share; `location` turns `--store`
into one of them.
"""
