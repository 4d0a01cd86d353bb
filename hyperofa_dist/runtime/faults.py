"""Fault hooks for the failure drills of the tests: what a training loop calls at its hook points.

Production runs use `Hooks()`, whose hooks do nothing. The tests set `HYPEROFA_FAULT` for a launched job
(`nan@<step>`: the loss of that optimizer step becomes NaN; `kill@<step>`: rank 0 kills itself with SIGKILL
before that step; `slow@<ms>`: every optimizer step waits that long first, so a drill can act on a run in the
middle), which `hooks_from_env` turns into `FaultHooks`. The loops hold no fault logic of their own.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

FAULT_ENV = "HYPEROFA_FAULT"


class Hooks:
    def before_step(self, step: int, rank: int) -> None:
        """Called before optimizer step `step` (1-based) begins."""

    def loss(self, step: int, loss: Any) -> Any:
        """The loss of a micro-batch of optimizer step `step`, as the loop will use it."""
        return loss


class FaultHooks(Hooks):
    def __init__(self, kind: str, step: int):
        if kind not in ("nan", "kill", "slow"):
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}; expected nan@<step>, kill@<step> or slow@<ms>")
        self.kind, self.step = kind, step

    def before_step(self, step: int, rank: int) -> None:
        if self.kind == "kill" and step == self.step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "slow":
            time.sleep(self.step / 1000)

    def loss(self, step: int, loss: Any) -> Any:
        return loss * float("nan") if self.kind == "nan" and step == self.step else loss


def hooks_from_env() -> Hooks:
    spec = os.environ.get(FAULT_ENV, "")
    if "@" not in spec:
        return Hooks()
    kind, step = spec.split("@", 1)
    return FaultHooks(kind, int(step))
