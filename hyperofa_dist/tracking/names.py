"""What MLflow runs are called and tagged, where the store is, and how a tracker reaches it: the names every
tool of the system reads (compare, tests, docs/MLFLOW.md), the run directory's identity, the tracking URI
(with credentials kept out of the run directory) and the one way a client is made."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..config import Config, flatten
from ..errors import HyperofaError, is_redacted, redact

# Tags every tool of the system reads (compare, tests, docs/MLFLOW.md).
COMMAND_TAG = "hyperofa.command"  # parent runs: the command
STAGE_TAG = "hyperofa.stage"  # stage runs: tokenizer, prepare, vectors, mapping, hypernet, init, pretrain, ...
METHOD_TAG = "init.method"  # runs about one init method's model: init, pretrain, evaluate
STEP_TAG = "hyperofa.step"  # evaluate runs (and model versions): the pretraining step of the model
PIPELINE_TAG = "hyperofa.pipeline"  # every run: short sha256 of the resolved run directory
RUN_DIR_TAG = "hyperofa.run_dir"  # every run: the resolved run directory itself
REUSED_TAG = "hyperofa.reused"  # parent runs: the stages found up to date (no run of their own)
RESUMED_TAG = "hyperofa.resumed"  # stage runs continued by a resumed job: how many times
OBJECTIVE_TAG = "hyperofa.objective"  # pretrain runs: masked or causal, what train/loss and eval/loss measure
MODEL_DIR_TAG = "hyperofa.model_dir"  # runs that exported a model: where it is on disk
MODEL_VERSION_TAG = "hyperofa.model_version"  # ... and its registered version, `<name>/<version>`
MODEL_ARTIFACT = "model"  # the artifact path of a logged model directory
OUTAGE_METRIC = "tracking.outage_errors"  # failed attempts to reach the store, logged once it answers again


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def pipeline_id(run_dir: str | Path) -> str:
    """The identity of a pipeline: the first 12 hex digits of the sha256 of its resolved run directory."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:12]


def registered_model_name(experiment: str, method: str) -> str:
    """`<experiment>-<method>`: one registered model per init method, a version per exported model."""
    return f"{experiment}-{method}"


# A job's ranks read the tracking URI from here when the job file holds it redacted (credentials are never written
# into the run directory); pdsh and ssh launchers forward MLFLOW_* variables to remote ranks.
SECRET_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri_of(config: Config) -> str:
    """The tracking URI to connect to. A configured URI with credentials is the real one (this process read it
    from the user); one whose credentials were redacted (a job file) is completed from SECRET_URI_ENV."""
    uri = config.tracking.tracking_uri or default_tracking_uri(config.run_dir)
    if not is_redacted(uri):
        return uri
    real = os.environ.get(SECRET_URI_ENV)
    if real is None or redact(real) != uri:
        raise HyperofaError(
            f"tracking.tracking_uri {uri}: its credentials are redacted here and {SECRET_URI_ENV} does not hold the "
            "real URI; the command that launched this job sets it, so launch through hyperofa or set it yourself"
        )
    return real


def mlflow_client(tracking_uri: str) -> Any:
    """An explicit MLflow client on `tracking_uri` (runs and the model registry): no global fluent state, and a
    store that does not answer costs seconds, not MLflow's default minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def local_path(uri: str) -> Optional[Path]:
    """The directory of a local artifact URI (`file:///...` or a plain path), else None (server, S3, ...)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


def now_ms() -> int:
    return int(time.time() * 1000)


def param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def numeric_metrics(tree: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of nested statistics as MLflow metrics (`source.length_percentiles.50`); booleans 0/1."""
    import numbers

    return {
        key: float(value)
        for key, value in flatten(tree).items()
        if isinstance(value, numbers.Number) and not isinstance(value, complex)
    }


def tracking_store_dir(config: Any) -> Optional[Path]:
    """The local directory MLflow writes (the sqlite file's, or a file store), or None for a server/no tracking."""
    if not config.tracking.enabled:
        return None
    uri = config.tracking.tracking_uri
    if uri is None:
        return config.run_dir
    if uri.startswith("sqlite:///"):
        # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's spelling), maybe with ?options
        return Path(uri[len("sqlite:///") :].split("?", 1)[0]).absolute().parent
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).absolute()
    if "://" not in uri and uri != "databricks":
        return Path(uri).absolute()
    return None
