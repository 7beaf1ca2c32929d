"""Prometheus metrics over HTTP (`--metrics ADDR:PORT`), read from the daemon's status.

`prometheus_client` serves `/metrics` from a thread of its own. On each
scrape a `StatusCollector` asks the daemon for its status (the function it
is given runs it in the daemon's trio thread, where the state lives) and
turns it into metric families with the role's `families` function
(`upmt_client.metrics`, `anchor_node.metrics`), so the figures are those of
`status` at that moment and nothing is computed between scrapes. A daemon
that cannot answer (it is stopping) is reported as `<prefix>_up 0`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import trio
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ground.errors import SetupError

__all__ = ["MetricsServer", "StatusCollector", "counter_families", "gauge", "start_metrics"]

log = logging.getLogger("upmt.metrics")
JSON = dict[str, Any]
Families = Callable[[JSON], Iterable[Metric]]


class StatusCollector(Collector):
    def __init__(self, prefix: str, status: Callable[[], JSON], families: Families) -> None:
        self.prefix = prefix
        self._status = status
        self._families = families

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._status()
        except Exception as exc:  # the daemon is stopping, or its loop is gone
            log.debug("metrics: no status (%r)", exc)
            yield gauge(f"{self.prefix}_up", "Whether the daemon answered this scrape.", 0)
            return
        yield gauge(f"{self.prefix}_up", "Whether the daemon answered this scrape.", 1)
        yield from self._families(status)


class MetricsServer:
    """The HTTP endpoint, started at once; `close` stops it."""

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        registry = CollectorRegistry(auto_describe=False)  # no status read at registration
        registry.register(collector)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise SetupError(f"--metrics {host}:{port}: {exc.strerror or exc}") from None
        self.address: tuple[str, int] = (host, int(self._server.server_address[1]))
        log.info("metrics on http://%s:%d/metrics", host, self.address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter_families(prefix: str, counters: Mapping[str, int], doc: str) -> list[Metric]:
    """One counter per entry of `counters` (`<prefix>_<name>_total`), as `status` counts them."""
    return [
        CounterMetricFamily(f"{prefix}_{name}", f"{doc}: {name}.", value=value)
        for name, value in sorted(counters.items())
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def start_metrics(
    stack: contextlib.ExitStack,
    endpoint: tuple[str, int] | None,
    prefix: str,
    status: Callable[[], JSON],
    families: Families,
) -> MetricsServer | None:
    """Serve `families(status())` at `endpoint` (None: off) until `stack` closes.

    Called from the daemon's trio thread: each scrape runs `status` there.
    """
    if endpoint is None:
        return None
    token = trio.lowlevel.current_trio_token()

    def in_trio() -> JSON:
        return trio.from_thread.run_sync(status, trio_token=token)

    server = MetricsServer(*endpoint, StatusCollector(prefix, in_trio, families))
    stack.callback(server.close)
    return server
