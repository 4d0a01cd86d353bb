"""`hyperofa compare` over a real sqlite MLflow store: series per method (and pipeline), tables, plotted data,
artifacts, the up-to-date re-run, errors."""

from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from hyperofa_dist.cli import main
from hyperofa_dist.compare import core
from hyperofa_dist.compare.stage import load_runs, write
from hyperofa_dist.config import load_config
from hyperofa_dist.tracking import METHOD_TAG, STEP_TAG, make_tracker, open_store

LOSS = {  # Figure 2(a), mono-100, digitised from the HyperOFA report's Figure 2(a)
    "hyperofa": [5.74, 3.92, 3.56, 3.37],
    "ofa": [5.71, 3.99, 3.59, 3.40],
    "random": [6.02, 4.31, 3.84, 3.61],
}
SRT = {"hyperofa": [6.0, 7.6, 9.1], "ofa": [5.9, 8.6, 12.0], "random": [4.4, 6.4, 8.2]}
LANGS = ("qac_Latn", "qad_Cyrl")
PATTERNS = ["train/loss", "eval/loss", "*average*"]


def log_pipeline(run_dir, uri, experiment, shift=0.0, methods=("hyperofa", "ofa", "random")):
    """What `hyperofa pipeline` logs, reduced to what compare reads: per method a `pretrain/<m>` run (train/loss
    every 500 steps, eval/loss and eval/<lang>/loss at 0, 1000, 2000) and `evaluate/<m>@<step>` runs at 0, 1000,
    2000; for ofa also an older `pretrain/ofa` run that a re-run replaced (it must not be drawn)."""
    config = load_config(None, [f"run.dir={run_dir}", f"tracking.tracking_uri={uri}",
                                f"tracking.experiment={experiment}"])
    tracker = make_tracker(config)
    ids = {}
    with tracker.session("pipeline"):
        if "ofa" in methods:
            with tracker.stage("pretrain/ofa", tags={METHOD_TAG: "ofa"}) as run:
                run.log_metrics({"train/loss": 9.0}, step=500)
        for method in methods:
            losses = [v + shift for v in LOSS[method]]
            with tracker.stage(f"pretrain/{method}", config, tags={METHOD_TAG: method}) as run:
                for i, value in enumerate(losses):
                    run.log_metrics({"train/loss": value, "train/lr": 1e-4}, step=500 * (i + 1))
                for step in (0, 1000, 2000):
                    per_lang = {lang: losses[-1] + 0.5 + i + (2000 - step) / 1000 for i, lang in enumerate(LANGS)}
                    run.log_metrics({**{f"eval/{lang}/loss": v for lang, v in per_lang.items()},
                                     "eval/loss": sum(per_lang.values()) / len(per_lang)}, step=step)
                ids[method] = run.run_id
            for i, value in enumerate(SRT[method]):
                step = 1000 * i
                with tracker.stage(f"evaluate/{method}@{step}", tags={METHOD_TAG: method, STEP_TAG: step,
                                                                      "evaluate.name": f"x-{method}"}) as run:
                    run.log_metrics({"srt.average.top10": value + shift, "srt.qac_Latn.top10": value}, step=step)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    uri = f"sqlite:///{root / 'store.db'}"
    ids = log_pipeline(root / "k100", uri, "cmp")
    log_pipeline(root / "k100", uri, "two")
    log_pipeline(root / "k400", uri, "two", shift=-0.5, methods=("hyperofa", "random"))
    return root, uri, ids


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_one_pipeline_one_series_per_method(store, capsys):
    root, uri, ids = store
    run_dir = root / "k100"
    args = ["compare", "--experiment", "cmp", f"run.dir={run_dir}", f"tracking.tracking_uri={uri}",
            "tracking.experiment=cmp-report"]
    assert main(args) == 0
    out = run_dir / "compare" / "cmp"
    assert "12 runs (hyperofa, ofa, random;" in capsys.readouterr().err

    # The core's data: one training-loss series per method with exactly the logged points (the superseded
    # pretrain/ofa run is left out), held-out loss per language in panels, SR-T per method merged over runs.
    runs, left_out = load_runs(open_store(uri), PATTERNS, "cmp")
    assert {r.run_id for r in runs if r.name.startswith("pretrain/")} == set(ids.values())
    result = core.compare(runs, PATTERNS)
    written = write(result, run_dir / "again")
    loss_lines = written.plots["training_loss.png"]
    assert loss_lines == {m: ([500.0, 1000.0, 1500.0, 2000.0], v) for m, v in LOSS.items()}
    assert result.figures["training_loss.png"].panels[""] == {
        m: [(500 * (i + 1), v) for i, v in enumerate(values)] for m, values in LOSS.items()}
    assert written.plots["srt.average.top10.png"] == {m: ([0.0, 1000.0, 2000.0], v) for m, v in SRT.items()}
    by_language = written.plots["eval_loss_by_language.png"]
    assert sorted(by_language) == sorted(f"{lang}: {m}" for lang in LANGS for m in LOSS)
    assert all(xs == [0.0, 1000.0, 2000.0] for xs, _ in by_language.values())
    assert set(written.plots["eval_loss.png"]) == set(LOSS)

    # table: one row per (method, evaluated step); summary: step 0 and final side by side, steps to random's loss.
    rows = read_csv(out / "table.csv")
    assert [(r["method"], int(r["step"])) for r in rows] == [(m, s) for m in sorted(LOSS) for s in (0, 1000, 2000)]
    assert list(rows[0]) == ["method", "pipeline", "step", "train/loss", "eval/loss", "srt.average.top10"]
    assert {r["pipeline"] for r in rows} == {"k100"}
    at = {(r["method"], int(r["step"])): r for r in rows}
    assert float(at["ofa", 2000]["srt.average.top10"]) == 12.0 and float(at["ofa", 1000]["train/loss"]) == 3.99
    assert at["ofa", 0]["train/loss"] == ""
    summary = {r["method"]: r for r in read_csv(out / "summary.csv")}
    assert float(summary["ofa"]["srt.average.top10@0"]) == 5.9 and float(summary["ofa"]["srt.average.top10@final"]) == 12.0
    assert {m: r["steps_to_random_final_loss"] for m, r in summary.items()} == {
        "hyperofa": "1500", "ofa": "1500", "random": "2000"}
    assert (out / "summary.md").read_text().startswith("| method | pipeline | final_step | eval/loss@0 | eval/loss@final |")
    for name in ("training_loss.png", "eval_loss.png", "eval_loss_by_language.png", "srt.average.top10.png"):
        assert_png(out / name)

    # The CLI run logged its files as artifacts of its compare run (in the report experiment).
    client = MlflowClient(uri)
    report = client.get_experiment_by_name("cmp-report")
    (stage,) = client.search_runs([report.experiment_id], "tags.`hyperofa.stage` = 'compare'")
    logged = sorted(a.path for a in client.list_artifacts(stage.info.run_id, "compare"))
    assert "compare/training_loss.png" in logged and "compare/summary.csv" in logged and "compare/table.md" in logged

    # Nothing changed in the compared runs: a second compare opens no compare run and redraws nothing.
    before = (out / "table.csv").stat().st_mtime_ns
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().err
    assert len(client.search_runs([report.experiment_id], "tags.`hyperofa.stage` = 'compare'")) == 1
    assert (out / "table.csv").stat().st_mtime_ns == before


def test_two_pipelines_in_one_experiment_are_told_apart(store):
    _, uri, _ = store
    runs, _ = load_runs(open_store(uri), PATTERNS, "two")
    result = core.compare(runs, PATTERNS)
    loss = result.figures["training_loss.png"].panels[""]
    assert sorted(loss) == ["hyperofa (k100)", "hyperofa (k400)", "ofa (k100)", "random (k100)", "random (k400)"]
    assert [v for _, v in loss["random (k400)"]] == pytest.approx([v - 0.5 for v in LOSS["random"]])
    style = core.styles(result.series)
    assert style["hyperofa (k100)"]["color"] == style["hyperofa (k400)"]["color"]
    assert style["hyperofa (k100)"]["linestyle"] != style["hyperofa (k400)"]["linestyle"]
    assert len(result.table) == 5 * 3
    steps_to = {(r["method"], r["pipeline"]): r[core.STEPS_TO_BASELINE] for r in result.summary}
    assert steps_to == {("hyperofa", "k100"): 1500, ("ofa", "k100"): 1500, ("random", "k100"): 2000,
                        ("hyperofa", "k400"): 1500, ("random", "k400"): 2000}


def test_compare_run_ids(store):
    root, uri, ids = store
    run_dir = root / "k100"
    chosen = f"{ids['ofa']},{ids['random']}"
    assert main(["compare", "--runs", chosen, f"run.dir={run_dir}", f"tracking.tracking_uri={uri}",
                 "tracking.enabled=false"]) == 0
    out = run_dir / "compare" / "runs"
    rows = read_csv(out / "table.csv")
    assert sorted({r["method"] for r in rows}) == ["ofa", "random"]
    assert_png(out / "training_loss.png")
    assert not (out / "srt.average.top10.png").exists()


def test_method_of_runs_without_tags():
    from hyperofa_dist.tracking import RunRecord

    legacy = RunRecord("a", "pretrain-train", {"hyperofa.stage": "pretrain-train"},
                       {"pretrain.method": "ofa", "init.method": "hyperofa"}, {"train/loss": 1.0})
    outside = RunRecord("b", "evaluate/xlmr@0", {"hyperofa.stage": "evaluate", "evaluate.name": "xlmr"},
                        {"init.method": "hyperofa"}, {"srt.average.top10": 1.0})
    assert core.run_method(legacy) == "ofa" and core.run_method(outside) == "xlmr"


@pytest.mark.parametrize("objectives, name", [((None,), "MLM"), (("masked",), "MLM"), (("causal", "causal"), "next-token"),
                                              (("causal", "masked"), "MLM / next-token")])
def test_loss_titles_name_the_pretraining_objective(objectives, name):
    from hyperofa_dist.tracking import RunRecord

    runs = [RunRecord(f"r{i}", f"pretrain/m{i}", {"hyperofa.stage": "pretrain", **({"hyperofa.objective": o} if o else {})},
                      {}, {"train/loss": 1.0, "eval/loss": 1.0}, history={"train/loss": [(1, 1.0)]})
            for i, o in enumerate(objectives)]
    runs.append(RunRecord("e", "evaluate/m0@0", {"hyperofa.stage": "evaluate", "hyperofa.objective": "masked"}, {}, {}))
    assert core.objective_name(runs) == name  # only the pretraining runs say what the losses are
    assert core.title("eval/loss", name) == f"held-out {name} loss, mean over languages (eval/loss)"
    assert core.compare(runs, ["eval/loss"]).figures["training_loss.png"].title == f"training {name} loss (train/loss)"


def test_failed_and_killed_runs_are_left_out_and_an_earlier_finished_run_counts():
    from hyperofa_dist.tracking import RunRecord

    tags = {"hyperofa.stage": "pretrain", "init.method": "ofa", "hyperofa.pipeline": "p1"}
    done = RunRecord("a", "pretrain/ofa", tags, {}, {"train/loss": 2.0}, start_time=1)
    killed = RunRecord("b", "pretrain/ofa", tags, {}, {"train/loss": 3.0}, start_time=2, status="KILLED")
    failed = RunRecord("c", "pretrain/random", {**tags, "init.method": "random"}, {}, {"train/loss": 4.0},
                       start_time=3, status="FAILED")
    running = RunRecord("d", "pretrain/hyperofa", {**tags, "init.method": "hyperofa"}, {}, {"train/loss": 1.5},
                        start_time=4, status="RUNNING")
    kept, left_out = core.select_runs([done, killed, failed, running], ["train/loss"])
    assert [r.run_id for r in kept] == ["d", "a"]  # a live run is shown; the killed one never hides the finished one
    assert sorted(r.run_id for r in left_out) == ["b", "c"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "MLflow experiment 'nope' not found"),
        (["--runs", "0123456789abcdef"], "run 0123456789abcdef not found"),
        (["--experiment", "cmp", "compare.metrics=[bleu]"], "no run has a metric matching compare.metrics ['bleu']"),
    ],
)
def test_compare_bad_input(store, capsys, args, message):
    root, uri, _ = store
    code = main(["compare", *args, f"run.dir={root / 'k100'}", f"tracking.tracking_uri={uri}", "tracking.enabled=false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyperofa")]
    assert code == 2 and len(err) == 1 and message in err[0]


def test_compare_without_store_is_an_error(tmp_path, capsys):
    code = main(["compare", f"run.dir={tmp_path}", "tracking.enabled=false"])
    assert code == 2 and "no MLflow store to compare" in capsys.readouterr().err


def test_summary_shows_the_init_stage_diagnostics_per_method(tmp_path):
    """Init runs (new-token loss and row statistics, logged once) take part and give each series `<metric>@0`
    columns; compare's patterns need not name them."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    log_pipeline(tmp_path / "k100", uri, "init-cmp", methods=("hyperofa", "random"))
    config = load_config(None, [f"run.dir={tmp_path / 'k100'}", f"tracking.tracking_uri={uri}",
                                "tracking.experiment=init-cmp"])
    tracker = make_tracker(config)
    logged = {"hyperofa": {"new_token_mlm_loss": 11.37, "rows/new/norm_mean": 0.38, "rows/new/mean_norm": 0.217,
                           "rows/new/cosine_to_copy_mean": 0.12, "rows/copy/norm_mean": 0.82, "heldout_cosine": 0.1},
              "mean": {"new_token_mlm_loss": 11.0, "rows/new/norm_mean": 0.5}}
    with tracker.session("pipeline"):
        for method, metrics in logged.items():
            with tracker.stage(f"init/{method}", config, tags={METHOD_TAG: method}) as run:
                run.log_metrics(metrics)
    runs, _ = load_runs(open_store(uri), PATTERNS, "init-cmp")
    assert {r.name for r in runs} >= {"init/hyperofa", "init/mean"}
    result = core.compare(runs, PATTERNS)
    assert result.init_metrics == ["new_token_mlm_loss", "rows/new/norm_mean", "rows/new/mean_norm",
                                   "rows/copy/norm_mean", "rows/new/cosine_to_copy_mean"]
    columns = core.summary_columns(result)
    assert columns[-5:] == [f"{m}@0" for m in result.init_metrics]
    summary = {r["method"]: r for r in result.summary}
    assert set(summary) == {"hyperofa", "mean", "random"}
    assert {m: summary["hyperofa"][f"{m}@0"] for m in result.init_metrics} == pytest.approx(
        {m: v for m, v in logged["hyperofa"].items() if m != "heldout_cosine"})
    assert summary["mean"]["new_token_mlm_loss@0"] == 11.0 and summary["mean"]["rows/new/mean_norm@0"] is None
    assert summary["random"]["new_token_mlm_loss@0"] is None  # a series without an init run
    assert summary["hyperofa"]["srt.average.top10@final"] == 9.1  # the pretraining/evaluation columns as before
    assert "heldout_cosine@0" not in columns  # only the listed diagnostics
    written = write(result, tmp_path / "out")
    header = (written.output_dir / "summary.md").read_text().splitlines()[0]
    assert header.endswith("| rows/copy/norm_mean@0 | rows/new/cosine_to_copy_mean@0 |")
