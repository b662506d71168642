"""Worker threads for the API's blocking handlers.

Handlers that read the swarm (its DHT) run on a few threads of their own: however many of them pile up while
the swarm is slow, the shared pool (Starlette's, 40 threads) stays free for everything else (hosting start,
stop and pause, policy, hardware), and the async handlers (status, stats, events) never need a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
from fastapi import Request

SWARM_THREADS = 8  # concurrent swarm-reading requests; more wait for a thread (each waits a bounded time)


async def run_swarm_read(request: Request, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` on one of the swarm readers' threads."""
    state = request.app.state
    limiter = getattr(state, "swarm_limiter", None)
    if limiter is None:  # made on first use: a limiter belongs to the running event loop
        limiter = state.swarm_limiter = anyio.CapacityLimiter(SWARM_THREADS)
    return await anyio.to_thread.run_sync(partial(function, *args), limiter=limiter)
