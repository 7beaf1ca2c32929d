"""The data-path thread: epoll over raw fds, one drain function per fd.

The data path runs here, outside the trio control plane, so that a burst of
packets never waits behind signalling and the control plane never waits
behind packets. Each drain function empties its fd until `BlockingIOError`
(docs/architecture.md, "The data path"): one wakeup moves as many packets as are queued. Registering
and unregistering fds is safe from any thread (epoll_ctl is). An optional
`tick` runs after every wakeup and at least every `tick_interval` seconds,
for work with deadlines (flows held while their owner is looked up).
"""

import contextlib
import os
import select
import threading
from collections.abc import Callable

Drain = Callable[[], None]


class Pump:
    def __init__(self, name: str, *, tick: Drain | None = None, tick_interval: float = 1.0) -> None:
        self._tick = tick
        self._tick_interval = tick_interval
        self._epoll = select.epoll()
        self._drains: dict[int, Drain] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.crashed: BaseException | None = None

    def add(self, fd: int, drain: Drain) -> None:
        self._drains[fd] = drain
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        self._drains.pop(fd, None)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Wake the thread, wait for it, release the epoll fd and the wake pipe."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poll = self._epoll.poll
        drains = self._drains
        tick = self._tick
        interval = self._tick_interval
        try:
            while not self._stopping:
                for fd, _events in poll(interval):
                    drain = drains.get(fd)
                    if drain is not None:
                        drain()
                if tick is not None:
                    tick()
        except BaseException as exc:  # surfaced by the control plane's health check
            if not self._stopping:
                self.crashed = exc
