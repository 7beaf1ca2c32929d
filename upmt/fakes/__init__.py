"""In-memory stand-ins for what the daemons get from the kernel, for tests without root.

`network`: a UDP network of addresses with NAT boxes in front of some of
them (address and port mapping, mapping timeouts, loss, blackholes,
rebinding), on a virtual clock, with an injectable random source, and its
sockets as the data-path engine sees them; `tun`: a TUN device. Like
wireguard-go's `conn/bindtest` and `tun/tuntest`, they live beside the code they stand in
for, and the project's system tests drive the protocol cores over them.
"""
