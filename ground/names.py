"""Names the kernel accepts, checked once for every command line and file that gives one."""


def is_ifname(name: str) -> bool:
    """What the kernel accepts as an interface name (dev_valid_name, IFNAMSIZ)."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) < 16
        and name not in (".", "..")
        and not any(c in "/:\0" or c.isspace() for c in name)
    )
