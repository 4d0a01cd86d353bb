"""`hyperofa compare` over a real sqlite MLflow store: table, one curve per run/method, PNGs, artifacts, errors."""

from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from hyperofa_dist.cli import main
from hyperofa_dist.config import load_config
from hyperofa_dist.compare.stage import compare_runs
from hyperofa_dist.tracking import default_tracking_uri, make_tracker

LOSS = {  # Figure 2(a), mono-100, digitised from the HyperOFA report's Figure 2(a)
    "hyperofa": [5.74, 3.92, 3.56, 3.37],
    "ofa": [5.71, 3.99, 3.59, 3.40],
    "random": [6.02, 4.31, 3.84, 3.61],
}
SRT = {"hyperofa": [6.0, 7.6, 9.1], "ofa": [5.9, 8.6, 12.0], "random": [4.4, 6.4, 8.2]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment 'cmp': per method a pretraining run as `hyperofa pretrain` logs it (train/loss every 500 steps,
    eval/loss; param pretrain.method, and the config default init.method=hyperofa that must not win), evaluation
    runs at steps 0/1000/2000 (tag init.method), and the parent session run, which has no metrics."""
    run_dir = tmp_path_factory.mktemp("cmp") / "run"
    config = load_config(None, [f"run.dir={run_dir}", "tracking.experiment=cmp"])
    tracker = make_tracker(config)
    ids = {}
    with tracker.session("pipeline"):
        for method, losses in LOSS.items():
            with tracker.stage("pretrain-train") as run:
                run.log_params({"pretrain.method": method, "init.method": "hyperofa"})
                for i, value in enumerate(losses):
                    run.log_metrics({"train/loss": value, "train/lr": 1e-4}, step=500 * (i + 1))
                run.log_metrics({"eval/loss": losses[-1] + 0.5, "eval/qac_Latn/loss": 9.0}, step=2000)
                ids[method] = run.run_id
            for i, value in enumerate(SRT[method]):
                with tracker.stage("evaluate") as run:
                    run.set_tags({"init.method": method})
                    run.log_metrics({"srt.average.top10": value, "srt.qac_Latn.top10": value}, step=1000 * i)
    return run_dir, ids


def assert_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_compare_experiment_writes_table_and_plots(store, capsys):
    run_dir, ids = store
    assert main(["compare", "--experiment", "cmp", f"run.dir={run_dir}", "tracking.experiment=cmp-report"]) == 0
    out = run_dir / "compare" / "cmp"
    client = MlflowClient(default_tracking_uri(run_dir))
    result = compare_runs(client, out, patterns=["train/loss", "eval/loss", "*average*"], experiment="cmp")

    # 12 runs with matching metrics; 'train/lr' and per-language metrics are not columns.
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert len(rows) == 12
    assert [r["init_method"] for r in rows] == sorted(r["init_method"] for r in rows)
    assert list(rows[0]) == ["init_method", "run", "run_id", "train/loss", "eval/loss", "srt.average.top10"]
    pretrain_rows = {r["init_method"]: r for r in rows if r["train/loss"]}
    assert {m: float(r["train/loss"]) for m, r in pretrain_rows.items()} == {m: v[-1] for m, v in LOSS.items()}
    assert {m: r["run_id"] for m, r in pretrain_rows.items()} == ids
    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0] == "| init method | run | run id | train/loss | eval/loss | srt.average.top10 |"
    assert len(markdown) == 14
    assert f"| hyperofa | pretrain-train | {ids['hyperofa']} | 3.37 | 3.87 |  |" in markdown

    # One training-loss curve per run, one metric curve per init method, with exactly the logged points.
    loss_lines = result.plots["training_loss.png"]
    assert len(loss_lines) == 3
    assert {label.split(" ")[0]: ys for label, (xs, ys) in loss_lines.items()} == LOSS
    assert all(xs == [500.0, 1000.0, 1500.0, 2000.0] for xs, _ in loss_lines.values())
    srt_lines = result.plots["srt.average.top10.png"]
    assert {label: (xs, ys) for label, (xs, ys) in srt_lines.items()} == {
        m: ([0.0, 1000.0, 2000.0], v) for m, v in SRT.items()
    }
    assert result.plots["eval_loss.png"] == {m: ([2000.0], [v[-1] + 0.5]) for m, v in LOSS.items()}
    for name in ("training_loss.png", "srt.average.top10.png", "eval_loss.png"):
        assert_png(out / name)

    # The CLI run logged the same files as artifacts of its compare stage (in the report experiment).
    report = client.get_experiment_by_name("cmp-report")
    (stage,) = client.search_runs([report.experiment_id], "tags.`hyperofa.stage` = 'compare'")
    logged = sorted(a.path for a in client.list_artifacts(stage.info.run_id, "compare"))
    names = ("eval_loss.png", "srt.average.top10.png", "table.csv", "table.md", "training_loss.png")
    assert logged == [f"compare/{n}" for n in names]
    assert "12 runs (hyperofa, ofa, random)" in capsys.readouterr().err


def test_compare_run_ids(store):
    run_dir, ids = store
    chosen = f"{ids['ofa']},{ids['random']}"
    assert main(["compare", "--runs", chosen, f"run.dir={run_dir}", "tracking.enabled=false"]) == 0
    out = run_dir / "compare" / "runs"
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["init_method"], r["run_id"]) for r in rows] == [("ofa", ids["ofa"]), ("random", ids["random"])]
    assert_png(out / "training_loss.png")
    assert not (out / "srt.average.top10.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "MLflow experiment 'nope' not found"),
        (["--runs", "0123456789abcdef"], "run 0123456789abcdef not found"),
        (["--experiment", "cmp", "compare.metrics=[bleu]"], "no run has a metric matching compare.metrics ['bleu']"),
    ],
)
def test_compare_bad_input(store, capsys, args, message):
    run_dir, _ = store
    code = main(["compare", *args, f"run.dir={run_dir}", "tracking.enabled=false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyperofa")]
    assert code == 2 and len(err) == 1 and message in err[0]


def test_compare_without_store_is_an_error(tmp_path, capsys):
    code = main(["compare", f"run.dir={tmp_path}", "tracking.enabled=false"])
    assert code == 2 and "no MLflow store to compare" in capsys.readouterr().err
