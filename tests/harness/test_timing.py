"""harness/timing.py with a fake clock and a fake device: what is called, what is waited
for, and what the numbers are; then once on real jitted JAX calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax.harness import timing


class FakeDevice:
  """A clock and an asynchronous device: a call returns at once and queues its work; a
  ``block_until_ready`` on its output advances the clock by all the work queued."""

  def __init__(self, monkeypatch, durations):
    self.now, self.queued, self.calls, self.blocks = 0.0, 0.0, 0, 0
    self.durations = iter(durations)
    monkeypatch.setattr(timing, "perf_counter", lambda: self.now)

  def fn(self, x):
    self.calls += 1
    self.queued += next(self.durations)
    return Output(self, x + self.calls)


class Output:

  def __init__(self, device, value):
    self.device, self.value = device, value

  def block_until_ready(self):
    self.device.blocks += 1
    self.device.now += self.device.queued
    self.device.queued = 0.0
    return self


def test_warm_up_then_one_call_per_rep(monkeypatch):
  dev = FakeDevice(monkeypatch, [5.0, 0.3, 0.1, 0.2])
  t = timing.time_fn(dev.fn, 10, reps=3)
  assert dev.calls == 4 and dev.blocks == 4  # every call waited for
  assert t.first_s == 5.0 and t.calls_per_rep == 1
  np.testing.assert_allclose(t.reps_s, [0.3, 0.1, 0.2])
  assert t.median_s == pytest.approx(0.2)
  assert t.output.value == 11  # the warm-up call's output
  assert t.as_dict() == {"median_s": t.median_s, "reps_s": t.reps_s, "first_s": 5.0}


def test_short_calls_run_back_to_back_and_block_once_per_rep(monkeypatch):
  # Warm-up 1 s, calibration 5 ms: 4 calls make a 20 ms rep.
  dev = FakeDevice(monkeypatch, [1.0, 0.005] + [0.004, 0.006, 0.005, 0.005] * 3)
  t = timing.time_fn(dev.fn, 0, reps=3, min_rep_s=0.02)
  assert t.calls_per_rep == 4
  assert dev.calls == 2 + 3 * 4 and dev.blocks == 2 + 3  # one block per rep
  np.testing.assert_allclose(t.reps_s, [0.005] * 3)  # seconds per call
  assert t.median_s == pytest.approx(0.005) and t.first_s == 1.0


def test_calls_per_rep_are_capped(monkeypatch):
  dev = FakeDevice(monkeypatch, [0.0] * (2 + 2 * timing.MAX_CALLS_PER_REP))
  t = timing.time_fn(dev.fn, 0, reps=2, min_rep_s=1.0)
  assert t.calls_per_rep == timing.MAX_CALLS_PER_REP
  assert dev.calls == 2 + 2 * timing.MAX_CALLS_PER_REP


@pytest.mark.parametrize("kw,match", [
    ({"reps": 0}, "reps=0: expected an int >= 1"), ({"reps": 2.0}, "reps=2.0"),
    ({"reps": True}, "reps=True"), ({"reps": 1, "min_rep_s": -1}, "min_rep_s=-1")])
def test_bad_arguments_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    timing.time_fn(lambda: 0, **kw)


def test_real_jitted_calls():
  fn = jax.jit(lambda x: (x @ x).sum())
  x = jnp.ones((64, 64), jnp.float32)
  t = timing.time_fn(fn, x, reps=3, min_rep_s=0.001)
  assert len(t.reps_s) == 3 and t.median_s == float(np.median(t.reps_s)) and t.median_s > 0
  assert t.first_s > 0 and 1 <= t.calls_per_rep <= timing.MAX_CALLS_PER_REP
  assert float(t.output) == 64.0 ** 3
