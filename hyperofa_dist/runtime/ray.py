"""Ray for the preparation stages (prepare, mapping): one way to get a cluster and one way to run tasks on it.

`ray_session(config)` starts a local Ray with `ray.num_cpus` CPUs (always a new one, even when another Ray runs
on the machine) when `ray.address` is unset, and joins that cluster when it is set (`auto`, `ray://head:10001`,
`head:6379`). Workers get `TOKENIZERS_PARALLELISM=false`: one Rust tokenizer thread per single-CPU task, so
tasks never oversubscribe cores nor hit the tokenizers fork warning. It shuts down only what it started.

`run_tasks` submits one single-CPU task per call, spread over the cluster's nodes (Ray's SPREAD strategy), with
Ray's retries for dead workers, shows a progress bar, and turns the first failure into one line (a task's own
`HyperofaError` keeps its message; a worker that kept dying past the retries names the config key that sets
them), cancelling every task still pending.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import HyperofaError

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def ray_session(config: Any) -> Iterator[object]:
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


def run_tasks(
    fn: Callable,
    calls: Sequence[tuple],
    *,
    desc: str,
    retries_key: str,
    max_retries: int,
    num_returns: int = 1,
    fetch: bool = True,
    weights: Optional[Sequence[int]] = None,
    unit: str = "task",
) -> list[Any]:
    """Run fn(*args) for every call as Ray tasks (Ray must be up); results, or object refs, in call order.

    With `fetch=False` the object refs come back instead of the values (a list of `num_returns` refs per call
    when `num_returns > 1`), for callers that merge large results one at a time; the first return value of such
    a task should be small, since it is fetched to learn whether the task succeeded. `weights` advance the
    progress bar per finished call (e.g. words per task) instead of one per task.
    """
    import ray
    from tqdm import tqdm

    # SPREAD: Ray's default packs tasks by load and locality, so a lightly loaded cluster can run a whole stage on
    # the driver's node; the preparation stages are CPU-bound and want every node.
    remote = ray.remote(num_cpus=1, max_retries=max_retries, num_returns=num_returns,
                        scheduling_strategy="SPREAD")(fn)
    refs = [remote.remote(*args) for args in calls]
    heads = [r[0] if num_returns > 1 else r for r in refs]
    index = {ref: i for i, ref in enumerate(heads)}
    weights = list(weights) if weights is not None else [1] * len(refs)
    results: list[Any] = [None] * len(refs)
    pending = list(heads)
    with tqdm(total=sum(weights), desc=desc, unit=unit, file=sys.stderr, mininterval=1.0, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in done:
                i = index[ref]
                try:
                    value = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise _task_error(exc, desc, retries_key) from None
                results[i] = value if fetch else refs[i]
                bar.update(weights[i])
    return results


def _task_error(exc: Exception, desc: str, retries_key: str) -> Exception:
    """A task's HyperofaError keeps its one line; a worker that kept dying past the retries becomes one too."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, HyperofaError):
        return HyperofaError(str(exc.cause))
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)
    if isinstance(exc, died):
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        return HyperofaError(f"{desc}: a Ray task failed after {retries_key} retries ({first[:200]})")
    return exc


def _pid(imports: Sequence[str] = ()) -> int:
    import importlib
    import time

    for module in imports:
        importlib.import_module(module)
    time.sleep(0.05)  # long enough that one worker cannot take every task of a round
    return os.getpid()


def wait_for_workers(workers: int, rounds: int = 20, imports: Sequence[str] = ()) -> None:
    """Block until `workers` Ray worker processes have run a task (that imported `imports`).

    `ray.init` returns before its worker processes are up; benchmarks count that boot, and a worker's one-time
    import of a stage's task module, as Ray's start-up, not as the stage's work."""
    import ray

    task = ray.remote(num_cpus=1)(_pid)
    seen: set[int] = set()
    for _ in range(rounds):
        seen.update(ray.get([task.remote(tuple(imports)) for _ in range(workers)]))
        if len(seen) >= workers:
            return
