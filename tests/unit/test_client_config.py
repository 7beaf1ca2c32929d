"""`ClientConfig.build`: what it accepts, how it normalises, what it refuses (one-line errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ground.errors import ConfigError
from upmt_client.config import ClientConfig


def build(**overrides: Any) -> ClientConfig:
    args: dict[str, Any] = {
        "anchor": "192.0.2.1",
        "sip_port": 5060,
        "tunnel_port": 1800,
        "terminal_id": "laptop-1",
        "interfaces": ("wlan0", "eth0"),
        "control": Path("/run/upmt/upmt-client.sock"),
        "run_dir": Path("/run/upmt/client"),
        "tun_name": "upmt0",
        "probe_interval": 1.0,
        "dead_after": 3,
        "expires": 600,
    }
    args.update(overrides)
    return ClientConfig.build(**args)


def test_defaults_accepted() -> None:
    """A plain configuration comes back as given."""
    cfg = build()
    assert (cfg.anchor, cfg.sip_port, cfg.tunnel_port) == ("192.0.2.1", 5060, 1800)
    assert cfg.terminal_id == "laptop-1"
    assert cfg.interfaces == ("wlan0", "eth0")
    assert cfg.tun_name == "upmt0"
    assert (cfg.probe_interval, cfg.dead_after, cfg.expires) == (1.0, 3, 600)


def test_anchor_port_overrides_sip_port() -> None:
    """`--anchor IP:PORT` sets the SIP port."""
    cfg = build(anchor="192.0.2.1:5070")
    assert (cfg.anchor, cfg.sip_port) == ("192.0.2.1", 5070)


def test_anchor_whitespace_stripped() -> None:
    """Surrounding blanks are forgiven."""
    assert build(anchor=" 192.0.2.1 ").anchor == "192.0.2.1"


def test_no_interfaces_means_auto() -> None:
    """An empty interface tuple is allowed (the daemon picks default-route interfaces)."""
    assert build(interfaces=()).interfaces == ()


@pytest.mark.parametrize(
    "anchor",
    [
        "",
        "not-an-ip",
        "anchor.example.net",
        "192.0.2",
        "192.0.2.256",
        "192.0.2.1.5",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:http",
        "2001:db8::1",
        "[2001:db8::1]:5060",
        "[192.0.2.1]",
    ],
)
def test_bad_anchor(anchor: str) -> None:
    """Anything but an IPv4 address (with an optional port): ConfigError on one line."""
    with pytest.raises(ConfigError) as info:
        build(anchor=anchor)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("terminal_id", ["a", "Laptop_1.home-2", "x" * 64, "0"])
def test_good_terminal_ids(terminal_id: str) -> None:
    """1-64 characters of letters, digits, '.', '_', '-'."""
    assert build(terminal_id=terminal_id).terminal_id == terminal_id


@pytest.mark.parametrize(
    "terminal_id",
    ["", "x" * 65, "bad id!", "a@b", "a:b", "a/b", "ümlaut", "tab\there", "line\nbreak"],
)
def test_bad_terminal_ids(terminal_id: str) -> None:
    """Other ids are refused with a message naming the option."""
    with pytest.raises(ConfigError, match="--terminal-id"):
        build(terminal_id=terminal_id)


@pytest.mark.parametrize("tun_name", ["upmt0", "t", "abcdefghijklmno", "tun-x_1.2"])
def test_good_tun_names(tun_name: str) -> None:
    """Kernel-valid interface names up to 15 bytes."""
    assert build(tun_name=tun_name).tun_name == tun_name


@pytest.mark.parametrize(
    "tun_name",
    ["", "abcdefghijklmnop", "a/b", "upmt 0", "a:1", "tab\t", ".", "..", "éééééééé"],
)
def test_bad_tun_names(tun_name: str) -> None:
    """Names the kernel would refuse are refused up front."""
    with pytest.raises(ConfigError, match="--tun-name"):
        build(tun_name=tun_name)


def test_interface_twice() -> None:
    """The same access interface twice is a mistake."""
    with pytest.raises(ConfigError, match="--interface"):
        build(interfaces=("wlan0", "eth0", "wlan0"))


def test_config_is_frozen() -> None:
    """A built configuration cannot be changed."""
    cfg = build()
    with pytest.raises(AttributeError):
        cfg.anchor = "198.51.100.1"  # type: ignore[misc]


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    from upmt_client.config import read_password

    path = tmp_path / "pw"
    path.write_text("secret\nignored\n")
    path.chmod(0o600)
    assert read_password(path) == "secret"
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_password(path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError):
        read_password(link)
