"""The pretraining loop's throughput over a logging window: tokens, blocks and step losses since the last report,
and the time they took."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Window:
    loss: float  # mean of the window's step losses
    tokens_per_s: float  # over every rank
    samples_per_s: float  # blocks per second, over every rank


class ThroughputMeter:
    """Counts micro-batches and steps; `take()` reports the window and starts counting anew. The clock restarts
    only on `restart()`, so the loop decides what a window's time includes (evaluation and checkpoint saves
    after a report are left out by restarting once they are done)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started = clock()
        self.tokens = self.blocks = self.steps = 0
        self.loss = 0.0

    def micro_batch(self, tokens: int, blocks: int) -> None:
        self.tokens += tokens
        self.blocks += blocks

    def step(self, loss: float) -> None:
        self.loss += loss
        self.steps += 1

    def take(self) -> Window:
        """The window since the last `take` (counts) and `restart` (time); counts go back to zero."""
        elapsed = max(self.clock() - self.started, 1e-9)
        window = Window(loss=self.loss / self.steps if self.steps else float("nan"),
                        tokens_per_s=self.tokens / elapsed, samples_per_s=self.blocks / elapsed)
        self.tokens = self.blocks = self.steps = 0
        self.loss = 0.0
        return window

    def restart(self) -> None:
        self.started = self.clock()
