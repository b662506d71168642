"""ApiServer: uvicorn on 127.0.0.1 in a background thread, with the port known before it serves."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

# Ports of the API servers alive in this process. hivemind starts its DHT peers as *forked* processes, which
# inherit every open file descriptor: a child holding a copy of an API connection keeps it open after
# uvicorn closes it, so the client never sees the close and sends its next keep-alive request into a socket
# nobody reads (it times out). Forked children therefore drop their copies of the API's sockets.
_api_ports: set[int] = set()
_fork_hook_installed = False


def _drop_inherited_api_sockets() -> None:
    """In a forked child: point every inherited socket of an API server at /dev/null (no reads, no close)."""
    if not _api_ports:
        return
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        fds = [int(name) for name in os.listdir(fd_dir)]
    except OSError:
        return
    null = -1
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket (or already gone)
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] in _api_ports:
                # dup2 instead of close: the fd number stays taken, so a later close by whoever owns the
                # Python object in this child cannot hit an unrelated file that reused the number.
                null = null if null >= 0 else os.open(os.devnull, os.O_RDWR)
                os.dup2(null, fd)
        except OSError:
            pass
        finally:
            sock.detach()
    if null >= 0:
        os.close(null)


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_drop_inherited_api_sockets)
        _fork_hook_installed = True


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
        _install_fork_hook()
        _api_ports.add(self.port)
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
        with contextlib.suppress(KeyError, TypeError):
            _api_ports.remove(self.port)
        self._server = self._thread = self._socket = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
