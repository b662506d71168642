"""ApiServer: uvicorn on 127.0.0.1 in a background thread, with the port known before it serves."""

from __future__ import annotations

import socket
import threading
import time


class ApiServer:
    """Serve an ASGI app on 127.0.0.1:`port` (0 = a free port) from a background thread.

    The socket is bound in start(), so `port` is known (and connections queue) before uvicorn accepts them.
    """

    def __init__(self, app, port: int = 0, *, host: str = "127.0.0.1", graceful_seconds: float = 2.0):
        self.app = app
        self.host = host
        self.requested_port = port
        self.graceful_seconds = graceful_seconds
        self.port: int | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ApiServer:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.requested_port))
        self._socket.listen(128)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=self.graceful_seconds,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="pollinate-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the API server on port {self.port} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("the API server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
