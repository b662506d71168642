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
import random
import signal
import sys
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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    """Copy reader to writer, each chunk held until its release time; EOF is passed on in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read():
        try:
            while chunk := await reader.read(CHUNK):
                now = time.monotonic()
                queue.put_nowait((link.release(now, len(chunk)), chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((link.release(time.monotonic(), 0), b""))

    async def write():
        while True:
            due, chunk = await queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not chunk:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()


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
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        """The port it listens on (the real one when listen_port was 0)."""
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _link(self) -> Link:
        return Link(self.delay, self.jitter, self.bytes_per_s)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                _pipe(reader, up_writer, self._link()), _pipe(up_reader, writer, self._link())
            )
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)


def parse_route(text: str) -> tuple[int, int]:
    """LISTEN_PORT:TARGET_PORT as two ints."""
    try:
        listen, target = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a route is LISTEN_PORT:TARGET_PORT, got {text!r}") from None
    if not (0 <= listen < 65536 and 0 < target < 65536):
        raise argparse.ArgumentTypeError(f"ports out of range in {text!r}")
    return listen, target


async def _serve(args) -> None:
    relays = [
        await Relay(
            listen,
            target,
            delay=args.delay_ms / 1000,
            jitter=args.jitter_ms / 1000,
            bytes_per_s=args.mbit * 1e6 / 8,
        ).start()
        for listen, target in args.routes
    ]
    print("relay ready " + " ".join(f"{r.port}->{r.target_port}" for r in relays), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for relay in relays:
        await relay.close()


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
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
