"""`fastsd serve` on one machine: the app under uvicorn, with a graceful SIGTERM.

SIGTERM first drains for `drain_seconds` (--drain-seconds, default 0): the server keeps
listening and serving, but /healthz answers 503 "draining", so a load balancer that polls
it takes the server out of rotation before its listener goes. Then (or at once, with no
drain, on a second SIGTERM, or on Ctrl+C) uvicorn closes the listener and idle keep-alive
connections, every request already received, queued or running finishes and gets its
response, and the process exits 0. A model that fails to load ends the server with the
CLI's bad-input code.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import uvicorn

from .app import ServeOptions, create_app

log = logging.getLogger("fastsd.serve")
EXIT_LOAD_FAILED = 2


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_seconds: float = 0.0):
        super().__init__(config)
        self.fastsd, self.drain_seconds = state, drain_seconds
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # /healthz says "draining" from now on. When should_exit is set, uvicorn closes the
        # listening socket and idle connections; a request already read (or being read)
        # still runs to its response.
        self.fastsd.stopping = True
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
        elif self.drain_seconds > 0 and self._drain is None:
            log.info("fastsd serve: SIGTERM: draining for %gs (/healthz answers 503), then stopping",
                     self.drain_seconds)
            self._drain = threading.Timer(self.drain_seconds, self._stop)
            self._drain.daemon = True
            self._drain.start()
        else:
            self._stop()  # graceful; uvicorn would re-raise SIGTERM afterwards (exit 143)

    def _stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        self.should_exit = True


def uvicorn_config(app, host: str, port: int, log_level: str = "info", **kw) -> uvicorn.Config:
    """uvicorn's config for the app: HTTP/1.1 with bounded request heads (431 over 64 KiB or
    100 fields, 408 past 30 s; fastsd/serve/protocol.py). Without httptools, uvicorn's h11
    protocol with its head size bound (a 400 past 64 KiB)."""
    from .protocol import MAX_HEAD_BYTES, bounded_protocol

    protocol = bounded_protocol()
    if protocol is None:  # httptools is not installed (uvicorn without [standard])
        return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http="h11",
                              h11_max_incomplete_event_size=MAX_HEAD_BYTES, **kw)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol, **kw)


def run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        drain_seconds: float = 0.0) -> int:
    """Serve until SIGTERM (after `drain_seconds` of draining) / Ctrl+C; returns the exit code."""
    outcome = {"code": 0}
    server: _Server | None = None

    def fatal(error: BaseException) -> None:
        print(f"fastsd: error: {error}", file=sys.stderr)
        outcome["code"] = EXIT_LOAD_FAILED
        if server is not None:
            server.should_exit = True

    if not log.handlers:  # the server's own lines (model loaded, clients gone) next to uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG if log_level == "debug" else logging.INFO)
        log.propagate = False
    app = create_app(options, on_fatal=fatal)
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            access_log=log_level == "debug")
    server = _Server(config, app.state.fastsd, drain_seconds)
    server.run()
    return outcome["code"]
