"""MLflow tracking: one parent run per command invocation, one named, tagged run per stage, rank 0 only.

Every MLflow call of the system goes through this module (docs/MLFLOW.md has the layout a user sees):
- `make_tracker(config)` gives the tracker of this process: `MlflowTracker` on global rank 0 (env `RANK`, unset
  means 0) when tracking is enabled, else the `NullTracker`, whose methods do nothing.
- `tracker.session(command)` opens the parent run of a command (`pipeline`, `demo`, `prepare`, ...);
  `tracker.stage(name, tags=...)` a child run named for what it is (`pretrain/ofa`, `evaluate/ofa@60`). Every run
  carries `hyperofa.pipeline` (a short hash of the resolved run directory) and `hyperofa.run_dir`, so runs of two
  pipelines sharing an experiment stay apart.
- A stage that is up to date opens no run; `tracker.reused(name)` records it on the parent (`hyperofa.reused`).
- A DeepSpeed job's rank 0 logs into the run its stage shell opened: the shell writes that run's id into the job
  file and the job calls `tracker.attach(run_id)` (no nested run, no second parent).
- `tracker.log_model(dir, name)` makes an HF model directory the run's `model/` artifact and a version of the
  registered model `name` (`tracking.log_models`: hard links into a local store, so no second copy on disk).
- `open_store(uri)` reads runs back for `hyperofa compare` as plain records.
The embedded default store is `sqlite:///<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts`; a real
`mlflow server` is used by setting `tracking.tracking_uri`.

Tracking cannot kill training (docs/MLFLOW.md, "Outages"): every write (metrics, params, tags, a run's end,
artifacts, models) is appended to this process's journal (formats/journal.py, `<run_dir>/tracking/`) and queued in
a bounded in-memory buffer (`tracking.buffer_size`; beyond it writes wait in the journal only) that one background
thread sends in order, retrying with exponential back-off up to `tracking.retry_seconds`. A write that failed once
may have reached the store, so its retry first reads back what the store has and sends only the rest: replay never
duplicates a metric point. An outage is one warning line and a count (`tracking.outage_errors`, logged when the
store answers again). Ending a scope waits at most `tracking.flush_seconds` for the buffer; what is left stays in the
journal, and the next tracker on the run directory (the next command, or the command that launched a job) replays
journals whose processes have ended. Only opening a run needs the store to answer (it makes the run id).

The package, by concern: `names` (tags, run-directory identity, the tracking URI and its credentials, the one
client), `tracker` (the two trackers, run lifecycle and logging, `make_tracker`), `delivery` (outbox, journal
replay, the idempotent writes), `store` (compare's read side). Import from `hyperofa_dist.tracking`.
"""

from __future__ import annotations

from .delivery import Outbox, apply_writes, link_tree, refused, replay_journals
from .names import (COMMAND_TAG, METHOD_TAG, MODEL_ARTIFACT, MODEL_DIR_TAG, MODEL_VERSION_TAG, OBJECTIVE_TAG,
                    OUTAGE_METRIC, PIPELINE_TAG, RESUMED_TAG, REUSED_TAG, RUN_DIR_TAG, SECRET_URI_ENV, STAGE_TAG,
                    STEP_TAG, default_tracking_uri, global_rank, numeric_metrics, pipeline_id, registered_model_name,
                    tracking_uri_of)
from .store import RunRecord, RunStore, open_store
from .tracker import MlflowTracker, NullTracker, make_tracker

__all__ = [
    "COMMAND_TAG", "METHOD_TAG", "MODEL_ARTIFACT", "MODEL_DIR_TAG", "MODEL_VERSION_TAG", "OBJECTIVE_TAG",
    "OUTAGE_METRIC", "PIPELINE_TAG", "RESUMED_TAG", "REUSED_TAG", "RUN_DIR_TAG", "SECRET_URI_ENV", "STAGE_TAG", "STEP_TAG",
    "MlflowTracker", "NullTracker", "Outbox", "RunRecord", "RunStore", "apply_writes", "default_tracking_uri",
    "global_rank", "link_tree", "make_tracker", "numeric_metrics", "open_store", "pipeline_id", "refused",
    "registered_model_name", "replay_journals", "tracking_uri_of",
]
