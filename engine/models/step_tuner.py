"""Which kernel and how many compute threads a short CPU step's products use, chosen from the steps' times.

A cached step of a few rows is bound by reading the span's weights, and which way of reading them is fastest
depends on the matrices' shapes, the CPU and what else runs on it. Measured on this project's 2-core bench
machine (one step, quiet machine, ms):

    span                              rows   MKL 1 thread   MKL 2 threads   oneDNN 1 thread   oneDNN 2 threads
    8 blocks, hidden 1024 (synthetic)    1           26.3            20.7              20.4               17.7
    SmolLM2's 30 blocks (hidden 576)     1           33.6            41.0              40.2               38.5
    SmolLM2's 30 blocks                  8           73.3            64.8              63.9               49.8

and under load from other processes a second thread may cost more than it brings. No fixed rule fits all of
that, so each span tries every plan (kernel x threads) per row count (once, the close ones a few times), then
keeps the plan whose recent steps were fastest, trying another one now and then so it notices when the
machine's load changes. Every plan computes the same products (summation order may differ by ~1e-6), so the
choice never changes what a step means, only how long it takes. Where native_linear.py's C kernel is built
it is a plan too (one thread), and the fixed rule's choice below 6 rows: in the chains of
bench/server_step.py (2 servers of the synthetic model) a 4-block step of one row took 7.2-8.1 ms with it,
10.4 with oneDNN and 12.9-13.4 with MKL (the servers' logs).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """How a step's products run: `kernel` "native" (native_linear.py's C kernel), "mkl" (MKL's gemm as
    weight @ rows.T, one row padded to two) or "onednn" (oneDNN's matmul), on `threads` compute threads."""

    kernel: str
    threads: int


def step_plans(threads: int, onednn: bool, native: bool = False) -> tuple[StepPlan, ...]:
    """The plans worth trying with `threads` configured compute threads: each kernel on one thread, and
    MKL's and oneDNN's on all of them where more than 2 are configured (native_linear.py's kernel is
    single-threaded). With 2, the second thread shares its core with the p2p daemons, the client and the
    other servers of a chain on the same machine: it won in isolation and lost in every chain measured here
    (bench/wan.py: SmolLM2, 1-9 rows; bench/server_step.py: one row), and each trial of a losing plan is a
    slow step a speculating client also sees."""
    kernels = ("mkl", "onednn") if onednn else ("mkl",)
    plans = [StepPlan("native", 1)] if native else []
    plans += [StepPlan(kernel, 1) for kernel in kernels]
    if threads > 2:
        plans += [StepPlan(kernel, threads) for kernel in kernels]
    return tuple(plans)


def rule_plan(threads: int, rows: int) -> StepPlan:
    """The fixed rule's plan for `rows` rows with `threads` configured (few_rows.kernel_for's kernel,
    lean_step.lean_threads' threads): the tuner's default."""
    from engine.models import native_linear
    from engine.models.few_rows import kernel_for, onednn_available
    from engine.models.lean_step import lean_threads

    threads = lean_threads(rows, threads)
    kernel = kernel_for(rows, onednn=onednn_available(), native=native_linear.available(), threads=threads)
    return StepPlan({"native": "native", "onednn": "onednn"}.get(kernel, "mkl"), threads)


class StepTuner:
    """Per row count: try each plan once, then the plans within `contender` times the fastest so far up to
    `trials` times, then use the plan with the lowest median over its last `window` steps; every
    `explore_every`-th step of a row count goes to the plan tried longest ago instead.

    With a `default` (rows -> plan, the fixed rule), another plan is used only when its median is faster by
    more than `margin` (1.1: 10%), so noise on a shared machine does not flip close plans back and forth.

    A clearly slower plan is not tried again at once: each trial of it costs a step that much slower, and a
    client that learns round times per size (speculation) would see them too.

    `choose` and `record` are called around each step (one step at a time: a server computes one step at a
    time, and a span belongs to one server)."""

    def __init__(
        self,
        plans: tuple[StepPlan, ...],
        *,
        trials: int = 3,
        window: int = 5,
        explore_every: int = 64,
        contender: float = 1.2,
        default: Callable[[int], StepPlan] | None = None,
        margin: float = 1.1,
    ):
        if not plans:
            raise ValueError("a step tuner needs at least one plan")
        if not 1 <= trials <= window:
            raise ValueError(f"trials ({trials}) must be between 1 and window ({window})")
        self.plans = plans
        self.trials = trials
        self.window = window
        self.explore_every = explore_every
        self.contender = contender
        self.default = default
        self.margin = margin
        self._times: dict[tuple[int, StepPlan], deque[float]] = {}
        self._last_tried: dict[tuple[int, StepPlan], int] = {}
        self._steps: dict[int, int] = {}

    def choose(self, rows: int) -> StepPlan:
        """The plan for the next step of `rows` rows."""
        for plan in self.plans:
            if (rows, plan) not in self._times:
                return plan
        best = self.best(rows)
        fastest = min(self._median(rows, plan) for plan in self.plans)
        for plan in self.plans:
            tried = len(self._times[(rows, plan)])
            if tried < self.trials and self._median(rows, plan) <= self.contender * fastest:
                return plan
        steps = self._steps.get(rows, 0)
        if len(self.plans) > 1 and steps and steps % self.explore_every == 0:
            others = [plan for plan in self.plans if plan != best]
            return min(others, key=lambda plan: self._last_tried.get((rows, plan), -1))
        return best

    def _median(self, rows: int, plan: StepPlan) -> float:
        return statistics.median(self._times[(rows, plan)])

    def record(self, rows: int, plan: StepPlan, seconds: float) -> None:
        """How long a step of `rows` rows took with `plan`."""
        key = (rows, plan)
        self._times.setdefault(key, deque(maxlen=self.window)).append(seconds)
        steps = self._steps.get(rows, 0) + 1
        self._steps[rows] = steps
        self._last_tried[key] = steps

    def best(self, rows: int) -> StepPlan:
        """The plan with the fastest recent steps of `rows` rows (the first plan while none is timed)."""
        timed = [plan for plan in self.plans if self._times.get((rows, plan))]
        if not timed:
            return self.default(rows) if self.default is not None else self.plans[0]
        fastest = min(timed, key=lambda plan: self._median(rows, plan))
        usual = self.default(rows) if self.default is not None else None
        if usual in timed and self._median(rows, fastest) * self.margin > self._median(rows, usual):
            return usual  # not clearly faster: keep the default (noise must not flip plans back and forth)
        return fastest

    def summary(self) -> str:
        """Every plan timed so far, by row count, e.g. "1 row: onednn/1 9.7 ms, mkl/1 12.8 ms; 2 rows: ..."
        (kernel/threads, median of the recent steps; the plan in use first)."""
        parts = []
        for rows in sorted(self._steps):
            timed = [plan for plan in self.plans if self._times.get((rows, plan))]
            timed.sort(key=lambda plan: statistics.median(self._times[(rows, plan)]))
            plans = ", ".join(
                f"{plan.kernel}/{plan.threads} {statistics.median(self._times[(rows, plan)]) * 1e3:.1f} ms"
                for plan in timed
            )
            parts.append(f"{rows} row{'s' if rows > 1 else ''}: {plans}")
        return "; ".join(parts)
