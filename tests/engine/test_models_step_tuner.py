"""The step tuner (engine/models/step_tuner.py) and its spans: plans chosen from the steps' own times."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from engine.models import few_rows, load_block_span, native_linear
from engine.models.step_tuner import StepPlan, StepTuner, step_plans

ROOT = Path(__file__).resolve().parents[2]
MKL1, DNN1, MKL2, DNN2 = StepPlan("mkl", 1), StepPlan("onednn", 1), StepPlan("mkl", 2), StepPlan("onednn", 2)


def test_plans_are_each_kernel_on_one_thread_and_on_all_of_more_than_two():
    assert step_plans(8, onednn=True) == (MKL1, DNN1, StepPlan("mkl", 8), StepPlan("onednn", 8))
    native = StepPlan("native", 1)  # the C kernel is single-threaded: never a plan on more threads
    assert step_plans(8, onednn=True, native=True) == (native, *step_plans(8, onednn=True))
    assert step_plans(2, onednn=False, native=True) == (native, MKL1)
    assert step_plans(2, onednn=True) == step_plans(1, onednn=True) == (MKL1, DNN1)  # 2 cores: 1 thread
    assert step_plans(4, onednn=False) == (MKL1, StepPlan("mkl", 4))
    with pytest.raises(ValueError, match="at least one plan"):
        StepTuner(())
    with pytest.raises(ValueError, match="trials"):
        StepTuner((MKL1,), trials=6, window=5)


def _run(tuner: StepTuner, rows: int, cost: dict[StepPlan, float], steps: int) -> list[StepPlan]:
    """Steps of `rows` rows where each plan takes cost[plan] seconds; the plans chosen, in order."""
    chosen = []
    for _ in range(steps):
        plan = tuner.choose(rows)
        tuner.record(rows, plan, cost[plan])
        chosen.append(plan)
    return chosen


def test_tries_every_plan_then_keeps_the_fastest_and_explores_now_and_then():
    tuner = StepTuner((MKL1, DNN1, MKL2, DNN2), trials=3, window=3, explore_every=10, contender=1.3)
    cost = {MKL1: 0.013, DNN1: 0.010, MKL2: 0.014, DNN2: 0.008}
    chosen = _run(tuner, 1, cost, 40)
    # Each plan once, then only the close ones (within 1.3x of the fastest: DNN1 at 1.25x) up to 3 times.
    assert chosen[:8] == [MKL1, DNN1, MKL2, DNN2, DNN1, DNN1, DNN2, DNN2]
    assert tuner.best(1) == DNN2
    explored = [step for step, plan in enumerate(chosen) if step >= 8 and plan != DNN2]
    assert explored == [10, 20, 30]  # one step in explore_every, to the plan tried longest ago
    assert [chosen[step] for step in explored] == [MKL1, MKL2, DNN1]
    # Row counts are tuned apart: two rows start from scratch.
    assert tuner.choose(2) == MKL1
    assert "1 row: onednn/2 8.0 ms, onednn/1 10.0 ms, mkl/1 13.0 ms, mkl/2 14.0 ms" in tuner.summary()


def test_follows_the_machine_when_the_best_plan_becomes_slow():
    # Two threads win on idle cores; once other processes take a core they lose, and the tuner moves.
    tuner = StepTuner((DNN1, DNN2), trials=2, window=3, explore_every=4, contender=2.0)
    _run(tuner, 1, {DNN1: 0.010, DNN2: 0.007}, 12)
    assert tuner.best(1) == DNN2
    chosen = _run(tuner, 1, {DNN1: 0.010, DNN2: 0.020}, 12)
    assert tuner.best(1) == DNN1 and chosen[-3:] == [DNN1] * 3


def test_preferred_kernel_overrides_the_fixed_rule_for_this_thread_only():
    assert few_rows.kernel_for(1, preferred="onednn") == "onednn"
    assert (
        few_rows.kernel_for(8, preferred="mkl") == "mm" and few_rows.kernel_for(1, preferred="mkl") == "pair"
    )
    assert few_rows.kernel_for(1, onednn=False, preferred="onednn") == "pair"  # no oneDNN: the rule
    assert few_rows.kernel_for(few_rows.FEW_ROWS + 1, preferred="onednn") == "linear"
    assert few_rows.kernel_for(8, native=True, preferred="native") == "native"
    assert few_rows.kernel_for(1, native=False, preferred="native") == "pair"  # not built: the rule
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))
    seen, used = [], []
    chosen = few_rows.kernel_for
    try:
        few_rows.kernel_for = lambda rows, **kwargs: (
            used.append(kwargs["preferred"]) or chosen(rows, **kwargs)
        )
        with few_rows.preferred_kernel("onednn"):
            out = few_rows.few_rows_linear(x, weight)
            other = threading.Thread(target=lambda: seen.append(few_rows._PREFERRED.__dict__.get("kernel")))
            other.start()
            other.join()
        few_rows.few_rows_linear(x, weight)
    finally:
        few_rows.kernel_for = chosen
    assert used == ["onednn", None] and seen == [None]
    torch.testing.assert_close(out, functional.linear(x, weight), rtol=1e-5, atol=2e-5)


def test_spans_tune_their_lean_steps_and_every_plan_computes_the_same(tiny_checkpoint_factory, monkeypatch):
    path = tiny_checkpoint_factory("llama")
    span = load_block_span(path, 0, 3)
    hidden = torch.randn(1, 12, span.config.hidden_size, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # more than 2: plans on 1 and on 3 threads
    try:
        cache = span.new_cache(1, 16)
        span.step(hidden[:, :8], cache)  # a prefill of 8 rows
        outputs = {}
        for _ in range(len(span.step_tuner().plans) * span.step_tuner().trials):
            past = cache.length
            plan = span.step_tuner().choose(1)
            outputs[plan] = span.step(hidden[:, 8:9], cache)
            cache.truncate(past)
            assert torch.get_num_threads() == 3  # each plan's threads are the step's only
    finally:
        torch.set_num_threads(before)
    tuner = span.step_tuner()
    # mkl/onednn x 1/3 threads (and the native kernel on 1 where it is built): all tried
    assert set(outputs) == set(tuner.plans) and len(tuner.plans) == 4 + native_linear.available()
    assert "1 row:" in tuner.summary() and "8 rows:" in tuner.summary()
    reference = outputs[tuner.plans[0]]
    for plan, output in outputs.items():
        assert (output - reference).abs().max().item() <= 1e-5, plan

    monkeypatch.setenv("POLLINATE_STEP_TUNING", "0")
    fixed = load_block_span(path, 0, 3)
    assert fixed.step_tuner() is None
    fixed.step(hidden[:, :8], fixed.new_cache(1, 16))
    assert fixed._tuner is None


def test_engine_sets_a_short_openmp_spin_unless_the_user_chose():
    code = "from engine import envs; envs.prefer_passive_openmp_threads(); import os; " + (
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    ran = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert ran.stdout.split() == ["PASSIVE", "10000"]
    env.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="5")
    ran = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert ran.stdout.split() == ["ACTIVE", "5"]


def test_a_default_plan_is_left_only_for_one_clearly_faster():
    rule = lambda rows: MKL1  # noqa: E731
    close = StepTuner((MKL1, DNN1), trials=2, window=3, default=rule, margin=1.1)
    assert close.best(1) == MKL1  # nothing timed yet: the default
    _run(close, 1, {MKL1: 0.0100, DNN1: 0.0095}, 8)  # oneDNN 5% faster: within the margin
    assert close.best(1) == MKL1
    clear = StepTuner((MKL1, DNN1), trials=2, window=3, default=rule, margin=1.1)
    chosen = _run(clear, 1, {MKL1: 0.0128, DNN1: 0.0097}, 8)  # 24% faster (the synthetic model's one row)
    assert clear.best(1) == DNN1 and chosen[-1] == DNN1
    from engine.models.step_tuner import rule_plan

    one_row = StepPlan("native", 1) if native_linear.available() else MKL1
    assert rule_plan(2, 1) == one_row and rule_plan(2, 8).threads == 1 and rule_plan(8, 8).threads == 8
