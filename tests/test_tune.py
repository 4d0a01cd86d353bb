"""`hyperofa tune hypernet`: seeded settings, the winner, one trial's new-token loss against init's, and the whole
command with real Ray Tune (ASHA) and MLflow on the generated init world."""

from __future__ import annotations

import json
import math

import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.cli import main
from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.tune.space import sample_settings, winner

SPACE = {"lr": [0.001, 0.003, 0.01], "hidden_size": [16, 32], "num_layers": [1]}
# A tiny search that still exercises ASHA: 4 trials, 3 epochs, the worse half stopped after epoch 1 and 2.
TINY = ["tune.trials=4", "tune.epochs=3", "tune.grace_epochs=1", "tune.reduction_factor=2",
        f"tune.space={json.dumps(SPACE)}", "hypernet.batch_size=16", "hypernet.dropout=0.1", "ray.num_cpus=2",
        "init.heldout_blocks=4"]


def test_settings_are_seeded_distinct_and_from_the_space():
    a = sample_settings(SPACE, 6, seed=3)
    assert a == sample_settings(SPACE, 6, seed=3)
    assert a != sample_settings(SPACE, 6, seed=4)
    assert len({tuple(sorted(s.items())) for s in a}) == 6  # the space has 6 combinations: all of them, once
    assert all(s[k] in SPACE[k] for s in a for k in SPACE)
    more = sample_settings(SPACE, 9, seed=3)
    assert more[:6] == a and len(more) == 9  # past the space's size draws repeat


def test_winner_is_the_lowest_finite_loss():
    rows = [{"l": 2.0}, {"l": math.nan}, {"l": 1.5}, {"l": 1.5}, {}]
    assert winner(rows, "l") == 2
    assert winner([{"l": math.nan}], "l") is None


def test_table_says_how_each_trial_ended_and_a_refused_setting_fails_only_its_trial():
    import ray.exceptions

    from hyperofa_dist.tune.stage import FAILED, _hyperofa_error, table_rows

    wrapped = ray.exceptions.RayTaskError("trial", "traceback", HyperofaError("loss is not finite at epoch 1"))
    assert str(_hyperofa_error(wrapped)) == "loss is not finite at epoch 1"
    assert _hyperofa_error(RuntimeError("a bug")) is None
    settings = [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}, {"lr": 0.4}]
    results = [
        {"epoch": 2, "val_loss": 1.0, "best_val_loss": 0.9, "best_epoch": 1, "new_token_loss": 6.5},
        {"epoch": 0, "val_loss": 2.0, "best_val_loss": 2.0, "best_epoch": 0},
        {"epoch": 1, "val_loss": 1.5, "best_val_loss": 1.5, "best_epoch": 1, "new_token_loss": 6.4},
        {"epoch": 0, "val_loss": 9.0, FAILED: "loss is not finite at epoch 1"},
    ]
    rows = table_rows(settings, results, epochs=3)
    assert [r["ended"] for r in rows] == ["finished", "stopped by ASHA", "early stopping",
                                          "failed: loss is not finite at epoch 1"]
    assert [r["epochs"] for r in rows] == [3, 1, 2, 1] and rows[0]["hypernet.lr"] == 0.1
    assert math.isnan(rows[1]["new_token_loss"]) and math.isnan(rows[3]["new_token_loss"])
    assert winner(rows, "new_token_loss") == 2


def test_space_refuses_keys_that_are_not_hypernet_settings():
    with pytest.raises(HyperofaError, match="tune.space"):
        load_config(None, ["tune.space={threads_per_rank: [1, 2]}"])
    with pytest.raises(HyperofaError, match="tune.space"):
        load_config(None, ["tune.space={epochs: [1, 2]}"])
    with pytest.raises(HyperofaError, match="tune.space"):
        load_config(None, ["tune.space={lr: []}"])


@pytest.fixture
def tune_world(tmp_path, init_worlds, prepare_format, small_corpus):
    """The xlmr init world's mapping, plus prepare-format held-out shards of its target tokenizer."""
    from transformers import AutoTokenizer

    w = init_worlds.fresh_run(init_worlds.get("xlmr"), tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    blocks = {
        lang: {"heldout": prepare_format.framed_blocks(tok, synthetic.read_lines(small_corpus / f"{lang}.txt", 80), 32)[:6]}
        for lang in ("qac_Latn", "qad_Grek")
    }
    prepare_format.write(w.run_dir / "prepare", blocks, w.target_tokenizer, 32)
    return w


def test_a_trial_reports_every_epoch_and_scores_its_model_as_init_does(tune_world, init_worlds, one_thread):
    """A trial reports each epoch's validation loss, and at its end the new-token loss of init's HyperOFA model: the
    init stage, handed the same hypernetwork's predictions, reports the same loss."""
    import torch

    from hyperofa_dist.method.hypernet.data import TokenSet
    from hyperofa_dist.method.hypernet.models import build_model
    from hyperofa_dist.method.hypernet.predict import predict_rows
    from hyperofa_dist.method.hypernet.settings import context_rule
    from hyperofa_dist.tune import trial as tr

    config = load_config(None, tune_world.overrides(*TINY, "hypernet.epochs=2", "hypernet.lr=0.003",
                                               "hypernet.hidden_size=16", "hypernet.num_layers=1",
                                               "init.ofa_centre=false"))
    hp = config.hypernet
    ws = tr.open_workspace(config, torch.device("cpu"))
    reports: list[dict] = []
    last = tr.run_trial(ws, hp, reports.append)
    assert [r["epoch"] for r in reports] == [0, 1] and reports[-1] is last
    assert all(math.isfinite(r["val_loss"]) for r in reports) and tr.NEW_TOKEN_LOSS not in reports[0]
    assert math.isfinite(last[tr.NEW_TOKEN_LOSS]) and last["best_epoch"] in (0, 1)

    torch.manual_seed(7)
    model = build_model("bilstm", word_dim=ws.mapping.word_dim, k=ws.mapping.k, num_layers=1, hidden_size=16,
                        num_heads=1, dropout=0.0).eval()
    scored = tr.hyperofa_loss(ws, hp, model)["loss"]["average"]
    rows = predict_rows(model, ws.table, TokenSet(ws.new_ids, ws.mapping.target_postings, None, ws.mapping.k,
                                                  context_rule(hp, config.run.seed, "target")),
                        batch_size=hp.predict_batch_size, cap=hp.max_context, device=torch.device("cpu"))
    init_worlds.write_hypernet(tune_world.run_dir, ws.new_ids, rows)
    assert main(["init", *tune_world.overrides("init.method=hyperofa", "init.heldout_blocks=4",
                                               "init.ofa_centre=false")]) == 0
    quality = json.loads((tune_world.run_dir / "init" / "hyperofa" / "quality.json").read_text())
    assert quality["new_token_mlm"]["loss"]["average"] == pytest.approx(scored, abs=1e-5)
    assert scored != pytest.approx(last[tr.NEW_TOKEN_LOSS], abs=1e-4)  # a trained hypernetwork scores otherwise

    # With init.ofa_centre a trial scores the centred rows, as init makes them.
    centred = load_config(None, tune_world.overrides(*TINY, "init.ofa_centre=true"))
    scored_centred = tr.hyperofa_loss(tr.open_workspace(centred, torch.device("cpu")), hp, model)["loss"]["average"]
    assert main(["init", *tune_world.overrides("init.method=hyperofa", "init.heldout_blocks=4",
                                               "init.ofa_centre=true")]) == 0
    quality = json.loads((tune_world.run_dir / "init" / "hyperofa" / "quality.json").read_text())
    assert quality["new_token_mlm"]["loss"]["average"] == pytest.approx(scored_centred, abs=1e-5)
    assert scored_centred != pytest.approx(scored, abs=1e-4)


def test_tune_refuses_a_run_without_held_out_text(tmp_path, init_worlds, one_line_error):
    import subprocess
    import sys

    w = init_worlds.fresh_run(init_worlds.get("xlmr"), tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "tune", "hypernet",
                          *w.overrides(*TINY, f"mapping.num_primitives={w.k}")],
                         capture_output=True, text=True)
    one_line_error(out, "tune", "held-out shards", "hyperofa prepare")
    assert not (w.run_dir / "tune").exists()


@pytest.mark.slow
def test_tune_hypernet_with_ray_tune_writes_the_winner_as_a_loadable_config(tune_world):
    from mlflow.tracking import MlflowClient

    from hyperofa_dist.formats import tune as fmt

    overrides = [o for o in tune_world.overrides(*TINY, f"mapping.num_primitives={tune_world.k}")
                 if o != "tracking.enabled=false"]
    assert main(["tune", "hypernet", *overrides]) == 0
    out = tune_world.run_dir / "tune" / "hypernet"
    rows = fmt.read_trials(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(float(r["val_loss"])) and math.isfinite(float(r["best_val_loss"])) for r in rows)
    finished = [r for r in rows if r["ended"] != "stopped by ASHA"]
    assert finished and all(math.isfinite(float(r["new_token_loss"])) for r in finished)
    assert all(r["new_token_loss"] == "" and int(r["epochs"]) < 3 for r in rows if r["ended"] == "stopped by ASHA")
    best = min(finished, key=lambda r: float(r["new_token_loss"]))
    summary = fmt.read_summary(out)
    assert summary["winner"]["trial"] == int(best["trial"])

    loaded = load_config(fmt.best_config_path(out))
    for key in SPACE:
        assert getattr(loaded.hypernet, key) == type(SPACE[key][0])(best[f"hypernet.{key}"])
    assert loaded.hypernet.epochs == 3 and loaded.run.dir == str(tune_world.run_dir)

    client = MlflowClient(tracking_uri=f"sqlite:///{tune_world.run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("hyperofa").experiment_id],
                             "attributes.run_name = 'tune/hypernet'")[0]
    assert run.data.params["best.hypernet.lr"] == best["hypernet.lr"]
    history = client.get_metric_history(run.info.run_id, "best_val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]

    assert main(["tune", "hypernet", *overrides]) == 0  # up to date: no Ray, same files
    assert fmt.read_trials(out) == rows
