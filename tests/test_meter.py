"""pretrain/meter.py: the pretraining loop's throughput window, on a clock the test moves."""

from __future__ import annotations

import math

from hyperofa_dist.pretrain.meter import ThroughputMeter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_window_reports_rates_over_its_time_and_mean_step_loss_then_counts_anew():
    clock = Clock()
    meter = ThroughputMeter(clock)
    for _ in range(4):  # two steps of two micro-batches: 2 ranks x 3 blocks x 32 tokens each
        meter.micro_batch(tokens=192, blocks=6)
    meter.step(2.0)
    meter.step(1.0)
    clock.now += 2.0
    window = meter.take()
    assert (window.loss, window.tokens_per_s, window.samples_per_s) == (1.5, 384.0, 12.0)
    # counts start again; the clock only when the loop says (evaluation and saves after a report are left out)
    clock.now += 2.0
    meter.micro_batch(tokens=100, blocks=1)
    meter.step(4.0)
    assert meter.take().tokens_per_s == 25.0
    meter.restart()
    clock.now += 0.5
    meter.micro_batch(tokens=100, blocks=1)
    meter.step(3.0)
    assert meter.take().tokens_per_s == 200.0


def test_an_empty_window_has_no_loss_and_no_division_by_zero():
    clock = Clock()
    window = ThroughputMeter(clock).take()
    assert math.isnan(window.loss) and window.tokens_per_s == 0.0 and window.samples_per_s == 0.0
