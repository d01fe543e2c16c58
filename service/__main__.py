"""Launcher: `python -m service --bundle DIR --host H --port P` (every setting also as SERVE_* environment)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import build_runtime, create_app
from service.bundle import BundleError
from service.config import HUGE_PAGES, Settings, huge_pages

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or Ctrl-C): stop admitting (/ready fails, new generation requests get 503), let the running
    requests finish for up to `drain_timeout` seconds, then shut down as uvicorn does. A second signal exits now."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.fastapi, self.drain_timeout, self.draining = app, drain_timeout, False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """After the lifespan (bundle loaded, engine running) and the bind: one line naming the bound address, the
        port the kernel chose when `--port 0` was asked for. Tests and supervisors read the port from it."""
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop where installed, else asyncio
            log.info("listening on http://%s:%d (event loop: %s)", host, port, loop)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.drain_timeout <= 0:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        self.fastapi.state.draining = True
        log.info("signal %d: draining (up to %.0fs) before shutdown", sig, self.drain_timeout)
        threading.Thread(target=self._drain, args=(sig, frame), name="drain", daemon=True).start()

    def _drain(self, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self.drain_timeout
        runtime = getattr(self.fastapi.state, "runtime", None)
        while runtime is not None and time.monotonic() < deadline:
            if not runtime.scheduler.num_running and not runtime.scheduler.num_waiting:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # let the last events reach their streams
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # bundle, checksums, device, golden outputs: a one-line error and no server when any is wrong
        runtime = build_runtime(settings)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if sys.platform == "linux":  # glibc reads its tunables at process start: the environment decides, we report
        on = huge_pages(os.environ)
        log.info("malloc huge pages %s", "on" if on else f"off (GLIBC_TUNABLES={HUGE_PAGES}: faster int4 decode)")
    app = create_app(settings, runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
        http="h11",  # its event-size bound is the header bound below (httptools has none)
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = DrainingServer(config, app, settings.drain_timeout)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
