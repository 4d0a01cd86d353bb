"""One way to get a Ray cluster for a stage: start a local one, or join the one `ray.address` names.

`ray_session(config)` is a context manager. With `ray.address` unset it starts a local Ray with
`ray.num_cpus` CPUs (always a new one, even when another Ray runs on the machine); set (`auto`,
`ray://head:10001`, `head:6379`) it joins that cluster. Either way workers
get `TOKENIZERS_PARALLELISM=false`: one Rust tokenizer thread per single-CPU task, so tasks never
oversubscribe cores nor hit the tokenizers fork warning. It shuts down only what it started: inside an
already initialised Ray (a benchmark that times start-up itself, a caller running several stages) it
leaves that Ray running.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from .config import Config
from .errors import HyperofaError

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def ray_session(config: Config) -> Iterator[object]:
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    try:
        if config.ray.address:
            ray.init(address=config.ray.address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # "local": always a fresh instance, never one another job left in /tmp/ray or RAY_ADDRESS names.
            ray.init(
                address="local",
                num_cpus=config.ray.num_cpus,
                runtime_env=runtime_env,
                include_dashboard=False,
                log_to_driver=True,
            )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        what = f"config key ray.address={config.ray.address}: cannot join" if config.ray.address else "cannot start"
        raise HyperofaError(f"{what} the Ray cluster ({str(exc).strip()[:200]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _pid() -> int:
    import os
    import time

    time.sleep(0.05)  # long enough that one worker cannot take every task of a round
    return os.getpid()


def wait_for_workers(workers: int, rounds: int = 20) -> None:
    """Block until `workers` Ray worker processes have run a task.

    `ray.init` returns before its worker processes are up; benchmarks count that boot as Ray's start-up, not
    as the stage's work."""
    import ray

    task = ray.remote(num_cpus=1)(_pid)
    seen: set[int] = set()
    for _ in range(rounds):
        seen.update(ray.get([task.remote() for _ in range(workers)]))
        if len(seen) >= workers:
            return
