"""Reading runs back for `hyperofa compare`: a tracking store's runs as plain records, and metric histories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import HyperofaError
from .names import mlflow_client


@dataclass
class RunRecord:
    """One run as `hyperofa compare` sees it: plain data, no MLflow object."""

    run_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # last value of each metric
    start_time: int = 0
    status: str = "FINISHED"
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # filled on request


class RunStore:
    """Read-only access to a tracking store: the runs of an experiment or given ids, and metric histories."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = mlflow_client(tracking_uri)

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise HyperofaError(f"MLflow experiment {experiment!r} not found (compare.experiment)")
        runs, token = [], None
        while True:
            page = self.client.search_runs([found.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        return [_record(r) for r in runs]

    def runs(self, run_ids: Sequence[str]) -> list[RunRecord]:
        out = []
        for run_id in run_ids:
            try:
                out.append(_record(self.client.get_run(run_id)))
            except Exception:  # MLflow raises MlflowException or a store error for an unknown id
                raise HyperofaError(f"compare.run_ids: run {run_id} not found in the tracking store") from None
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) sorted by step; several values at one step keep the latest logged (a resumed job logs
        the steps after its last checkpoint again)."""
        by_step: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        return [(step, value) for step, (_, value) in sorted(by_step.items())]

    def fill_history(self, runs: Sequence[RunRecord], keep: Any) -> None:
        """Fetch the history of every metric `keep(key)` accepts into `run.history`."""
        for run in runs:
            run.history = {k: self.history(run.run_id, k) for k in sorted(run.metrics) if keep(k)}


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        start_time=int(run.info.start_time or 0),
        status=str(run.info.status),
    )


def open_store(uri: str) -> RunStore:
    return RunStore(uri)
