"""``sts serve``'s uvicorn server, whose shutdown is bounded in time and ends every open request cleanly.

On SIGTERM or SIGINT (Ctrl-C) the server stops accepting connections and lets the open requests
decode on for ``shutdown_timeout`` seconds; then, or at once on a second signal, it aborts the
ones still open: each ends with ``finish_reason == "abort"`` (vLLM's term for a request the
server cancelled; a stream gets that chunk, then ``data: [DONE]``) and frees its slot. The
lifespan's shutdown then stops the scheduler's thread, and :meth:`uvicorn.Server.run` returns
without raising the signal again, so the process exits 0 with nothing on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any, Callable, Iterator

import uvicorn

log = logging.getLogger(__name__)

#: Seconds the aborted requests get to send their last event before uvicorn cancels their tasks (cuts them off), on
#: top of the longest the scheduler has been busy in one iteration (an abort of a decoding request takes effect after
#: the round in progress: seconds on a CPU).
ABORT_GRACE_S = 5.0
#: Seconds between two aborts once they are due (a request that arrived on an open connection is aborted too).
ABORT_POLL_S = 0.05


class BoundedServer(uvicorn.Server):
    """A :class:`uvicorn.Server` over ``app`` that aborts open requests ``shutdown_timeout`` seconds into its shutdown.

    ``abort`` cancels every open request and returns how many there were (``Scheduler.cancel_all``); ``busy_s``
    returns the longest the scheduler has taken for one iteration (``Scheduler.longest_step_s``), which the aborted
    requests' grace period adds; ``config`` is :class:`uvicorn.Config`'s keyword arguments (host, port, log_level).
    """

    def __init__(self, app: Any, abort: Callable[[], int], shutdown_timeout: float, busy_s: Callable[[], float],
                 **config: Any) -> None:
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout + ABORT_GRACE_S, **config))
        self.abort, self.shutdown_timeout, self.busy_s = abort, shutdown_timeout, busy_s
        self.signals = 0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to :meth:`handle_exit` while serving; unlike uvicorn's, raise neither afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup; on ``sockets`` bound beforehand (:func:`sts.serve.options.bound`) also its "Uvicorn
        running on" line, which uvicorn leaves to whoever bound them."""
        await super().startup(sockets)
        if sockets and self.started:
            self._log_started_message(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Count the signal and start the shutdown (a second signal makes the abort due at once, see :meth:`shutdown`)."""
        self.signals += 1
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with the open requests aborted once ``shutdown_timeout`` has passed or a second signal came."""
        # uvicorn cuts off the requests still open after this; the aborted ones end after the iteration in progress.
        self.config.timeout_graceful_shutdown = self.shutdown_timeout + ABORT_GRACE_S + self.busy_s()
        aborting = asyncio.create_task(self._abort_when_due())
        try:
            await super().shutdown(sockets)
        finally:
            aborting.cancel()

    async def _abort_when_due(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.shutdown_timeout
        while loop.time() < due and self.signals < 2:
            await asyncio.sleep(ABORT_POLL_S)
        while True:
            aborted = self.abort()
            if aborted:
                log.warning("shutting down: aborted %d open request(s) (finish_reason \"abort\")", aborted)
            await asyncio.sleep(ABORT_POLL_S)
