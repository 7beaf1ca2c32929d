"""The anchor node's NAPT and forwarding set-up in the kernel (nftables)."""
