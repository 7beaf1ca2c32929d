"""The TUN device both daemons forward through.

Created with python-pytun (IFF_TUN | IFF_NO_PI, not persistent, so the kernel
removes it when the daemon's fd closes, even after `kill -9`), configured
with pyroute2: IPv6 off before the link comes up (no router solicitations or
MLD reports in the data path), a long transmit queue (the default 500 drops
bursts), the MTU, one address, link up. The data path reads and writes the
raw fd with os.read/os.write in non-blocking drain loops.

With `vnet_hdr` the device is created with IFF_VNET_HDR and the richest
offload set the kernel accepts (`upmt.offload.negotiate_tun_offload`): every
read and write then starts with a virtio_net_hdr, and reads may be 64 KB
TCP super-packets. A TUN handed over by exec keeps its flags; `adopt_tun`
reads them back.
"""

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ground.errors import SetupError
from upmt.offload import negotiate_tun_offload, tun_has_vnet_hdr

TUN_PATH = Path("/dev/net/tun")
TX_QUEUE_LEN = 10_000


@dataclass
class TunDevice:
    name: str
    fd: int
    ifindex: int
    _dev: object = None  # the pytun object, or None for an fd handed over by exec
    mtu: int = 1500
    vnet_hdr: bool = False  # frames carry a virtio_net_hdr
    offload: int = 0  # TUN_F_* bits the kernel accepted
    offload_refused: str | None = None  # why a richer offload set was refused

    def close(self) -> None:
        """Close the fd: the kernel deletes the device with its routes."""
        if self.fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                if self._dev is not None:
                    self._dev.close()  # type: ignore[attr-defined]
                else:
                    os.close(self.fd)
            self.fd = -1


def adopt_tun(name: str, fd: int) -> TunDevice:
    """A TUN whose fd a previous process of ours handed over across exec."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise SetupError(f"the handed-over TUN {name} does not exist")
        mtu = ipr.get_links(found[0])[0].get_attr("IFLA_MTU")
    os.set_blocking(fd, False)
    tun = TunDevice(name=name, fd=fd, ifindex=found[0], mtu=int(mtu))
    try:
        tun.vnet_hdr = tun_has_vnet_hdr(fd)
    except OSError as exc:
        raise SetupError(f"the handed-over TUN {name}: TUNGETIFF: {exc.strerror}") from None
    if tun.vnet_hdr:
        tun.offload, tun.offload_refused = negotiate_tun_offload(fd)
    return tun


def open_tun(
    name: str, *, address: str, prefixlen: int, mtu: int, vnet_hdr: bool = False
) -> TunDevice:
    """Create and configure TUN `name`; SetupError with one line if the kernel refuses."""
    if not TUN_PATH.exists():
        raise SetupError(f"{TUN_PATH} is missing: load the tun module or pass the device in")
    import pytun  # imported here so that pure modules and CLIs load without it

    try:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code in (errno.EPERM, errno.EACCES):
            raise SetupError(f"cannot create TUN {name}: needs CAP_NET_ADMIN") from None
        if code == errno.EBUSY:
            raise SetupError(f"cannot create TUN {name}: the name is in use") from None
        raise SetupError(f"cannot create TUN {name}: {exc}") from None
    fd = dev.fileno()
    offload, refused = negotiate_tun_offload(fd) if vnet_hdr else (0, None)
    try:
        _disable_ipv6(name)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, mtu=mtu, txqlen=TX_QUEUE_LEN)
            ipr.addr("replace", index=idx, address=address, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
    except Exception as exc:
        dev.close()
        raise SetupError(f"cannot configure TUN {name}: {exc}") from None
    os.set_blocking(fd, False)
    return TunDevice(
        name=name,
        fd=fd,
        ifindex=idx,
        _dev=dev,
        mtu=mtu,
        vnet_hdr=vnet_hdr,
        offload=offload,
        offload_refused=refused,
    )


def _disable_ipv6(name: str) -> None:
    path = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    # Without IPv6 in this kernel or namespace there is nothing to silence.
    with contextlib.suppress(OSError):
        path.write_text("1\n")
