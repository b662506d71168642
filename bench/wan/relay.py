"""An asyncio TCP relay that forwards ports with a one-way delay (plus optional jitter and bandwidth cap).

These machines have no kernel netem, so the WAN bench puts one relay in front of each server: the server
listens on its own port and announces the relay's, and every peer that dials it pays the delay both ways.

Each direction of each connection is a link of its own: a chunk read at time t is written at
`link.release(t, nbytes)`, which never goes back in time, so bytes keep their order however the jitter falls.

    python -m bench.wan.relay --delay-ms 25 [--jitter-ms 0] [--mbit 0] LISTEN_PORT:TARGET_PORT [...]

prints "relay ready PORT->TARGET ..." once it listens on every LISTEN_PORT of 127.0.0.1 (0: a free port the
system picks) and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass
class Link:
    """When bytes leave one direction of a connection: a FIFO wire with latency, jitter and bandwidth.

    A chunk waits for the wire to be free (bandwidth), takes nbytes / bytes_per_s on it, then flies for
    delay + jitter; it is released no earlier than the chunk before it (order is kept).
    """

    delay: float  # seconds, one way
    jitter: float = 0.0  # seconds: each chunk's delay is delay + uniform(0, jitter)
    bytes_per_s: float = 0.0  # 0 = no cap
    rng: random.Random = field(default_factory=random.Random)
    _wire_free: float = 0.0
    _last_release: float = 0.0

    def __post_init__(self):
        if self.delay < 0 or self.jitter < 0 or self.bytes_per_s < 0:
            raise ValueError("delay, jitter and bandwidth must be >= 0")

    def release(self, arrival: float, nbytes: int) -> float:
        """The time a chunk of `nbytes` read at `arrival` is written out on the other side."""
        sent = arrival
        if self.bytes_per_s > 0:
            sent = max(arrival, self._wire_free) + nbytes / self.bytes_per_s
            self._wire_free = sent
        flight = self.delay + (self.rng.uniform(0, self.jitter) if self.jitter else 0.0)
        self._last_release = max(self._last_release, sent + flight)
        return self._last_release


def _forward(source: socket.socket, target: socket.socket, link: Link) -> None:
    """Copy one direction of a connection: each chunk read is held until its release time, then written;
    EOF is passed on in order. Two threads (read, write) so that reading goes on while chunks are in flight.

    Threads and time.sleep rather than an event loop: a loop's timers fire up to a millisecond late (epoll's
    resolution), which added 0.5-1 ms to every one-way delay; a sleeping thread wakes within ~0.1 ms.
    """
    chunks: queue.SimpleQueue = queue.SimpleQueue()

    def read():
        try:
            while chunk := source.recv(CHUNK):
                chunks.put((link.release(time.monotonic(), len(chunk)), chunk))
        except OSError:
            pass
        finally:
            chunks.put((link.release(time.monotonic(), 0), b""))

    def write():
        try:
            while True:
                due, chunk = chunks.get()
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                if not chunk:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(chunk)
        except OSError:
            source.close()  # the other side is gone: stop reading this direction too

    threading.Thread(target=read, daemon=True, name="relay-read").start()
    threading.Thread(target=write, daemon=True, name="relay-write").start()


class Relay:
    """Forwards 127.0.0.1:`listen_port` to `target_host`:`target_port` through two Links per connection."""

    def __init__(
        self,
        listen_port: int,
        target_port: int,
        *,
        delay: float,
        jitter: float = 0.0,
        bytes_per_s: float = 0.0,
        host: str = "127.0.0.1",
        target_host: str = "127.0.0.1",
    ):
        self.listen_port, self.target_port = listen_port, target_port
        self.delay, self.jitter, self.bytes_per_s = delay, jitter, bytes_per_s
        self.host, self.target_host = host, target_host
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        """The port it listens on (the real one when listen_port was 0)."""
        assert self._listener is not None, "start() first"
        return self._listener.getsockname()[1]

    async def start(self) -> Relay:
        """Listen and serve from threads (awaitable, so that asyncio code can start it too)."""
        self._listener = socket.create_server((self.host, self.listen_port))
        threading.Thread(target=self._accept_loop, daemon=True, name="relay-accept").start()
        return self

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets] if self._listener else list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _link(self) -> Link:
        return Link(self.delay, self.jitter, self.bytes_per_s)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((self.target_host, self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                # Every write goes out at once: Nagle's algorithm would hold a small one back up to an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            _forward(client, upstream, self._link())
            _forward(upstream, client, self._link())


def parse_route(text: str) -> tuple[int, int]:
    """LISTEN_PORT:TARGET_PORT as two ints."""
    try:
        listen, target = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a route is LISTEN_PORT:TARGET_PORT, got {text!r}") from None
    if not (0 <= listen < 65536 and 0 < target < 65536):
        raise argparse.ArgumentTypeError(f"ports out of range in {text!r}")
    return listen, target


def _serve(args) -> None:
    relays = [
        asyncio.run(
            Relay(
                listen,
                target,
                delay=args.delay_ms / 1000,
                jitter=args.jitter_ms / 1000,
                bytes_per_s=args.mbit * 1e6 / 8,
            ).start()
        )
        for listen, target in args.routes
    ]
    print("relay ready " + " ".join(f"{r.port}->{r.target_port}" for r in relays), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for relay in relays:
        relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("routes", nargs="+", type=parse_route, help="LISTEN_PORT:TARGET_PORT")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="extra delay, uniform in [0, jitter]")
    parser.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap per direction (0: none)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.jitter_ms < 0 or args.mbit < 0:
        parser.error("--delay-ms, --jitter-ms and --mbit must be >= 0")
    _serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
