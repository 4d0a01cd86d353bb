"""Bad input is refused before any training, with one line naming the file or key; DeepSpeed configs are filled
from the config and checked against what DeepSpeed 0.19.8 accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.files import save_npz
from hyperofa_dist.formats.mapping import SPLIT, load_mapping
from hyperofa_dist.hypernet.stage import run as run_hypernet_stage
from hyperofa_dist.method.hypernet.settings import training_split
from hyperofa_dist.runtime import dsconfig
from hyperofa_dist.runtime.device import resolve_precision
from hyperofa_dist.tracking import NullTracker


@pytest.fixture
def world(tmp_path, hypernet_kit):
    return hypernet_kit.mapping(tmp_path / "run")


def test_valid_mapping_loads_with_splits_restricted_to_covered_tokens(world):
    mapping = load_mapping(world.run_dir)
    assert (mapping.k, mapping.word_dim, mapping.n_words) == (8, 16, 3000)
    splits, _ = training_split(mapping)
    for part in ("train", "val", "test"):
        assert len(splits[part]) > 0
        assert (mapping.source_postings.lengths(splits[part]) > 0).all()


def test_postings_built_from_other_vectors_are_refused(world, tmp_path, hypernet_kit):
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the vectors the mapping used")
    with pytest.raises(HyperofaError, match="other word vectors than vectors.path"):
        run_hypernet_stage(hypernet_kit.config(world, f"vectors.path={other}"), NullTracker())


def test_k_different_from_the_mapping_is_refused(world, hypernet_kit):
    with pytest.raises(HyperofaError, match=r"built with k=8.*mapping.num_primitives=5"):
        run_hypernet_stage(hypernet_kit.config(world, "mapping.num_primitives=5"), NullTracker())


def test_empty_training_split_is_refused(world, hypernet_kit):
    split = world.run_dir / "mapping" / SPLIT
    with np.load(split) as data:
        parts = {k: data[k] for k in data}
    save_npz(split, train=np.zeros(0, np.int64), val=parts["val"], test=parts["test"])
    with pytest.raises(HyperofaError, match="training split is empty"):
        run_hypernet_stage(hypernet_kit.config(world), NullTracker())


def test_missing_mapping_stage_is_refused(tmp_path):
    with pytest.raises(HyperofaError, match="stage 'mapping' has not completed"):
        load_mapping(tmp_path)


def test_batch_larger_than_the_split_is_refused_before_launch(world, hypernet_kit):
    config = hypernet_kit.config(world, "hypernet.batch_size=4096", "hypernet.ranks_per_node=2")
    with pytest.raises(HyperofaError, match="hypernet.batch_size"):
        run_hypernet_stage(config, NullTracker())
    assert not (world.run_dir / "hypernet").exists()


def test_cli_reports_fingerprint_mismatch_in_one_line_and_trains_nothing(world, tmp_path, hypernet_kit, one_line_error):
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    args = hypernet_kit.overrides(world, f"vectors.path={other}")
    out = subprocess.run([sys.executable, "-m", "hyperofa_dist.cli", "hypernet", *args], capture_output=True, text=True)
    one_line_error(out, "hypernet", "other word vectors")
    assert not (world.run_dir / "hypernet").exists()


# --- DeepSpeed configs -------------------------------------------------------------------------------------


def test_templates_are_filled_from_the_config_and_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in dsconfig.TEMPLATE_NAMES:
        template, path = dsconfig.load_template(name)
        cfg = dsconfig.fill_ds_config(template, micro_batch=8, grad_accum=3, lr=2e-4, precision="bf16",
                                      torch_optimizer=True, source=path)
        assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 3
        assert cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["optimizer"]["params"]["torch_adam"] is True
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(cfg)
        parsed = DeepSpeedConfig(cfg)
        assert parsed.train_batch_size == 24
        assert parsed.zero_optimization_stage == template["zero_optimization"]["stage"]


def test_hard_coded_run_values_and_removed_keys_are_refused(tmp_path):
    template, _ = dsconfig.load_template("zero1")
    pinned = {**template, "train_micro_batch_size_per_gpu": 32}
    with pytest.raises(HyperofaError, match="train_micro_batch_size_per_gpu is 32; it must be \"auto\""):
        dsconfig.fill_ds_config(pinned, micro_batch=8, grad_accum=1, lr=1e-4, precision="fp32")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**template, "sparse_gradients": True}))
    with pytest.raises(HyperofaError, match=r"old.json: key 'sparse_gradients' was removed in DeepSpeed 0.19.8"):
        dsconfig.load_template(str(old))
    old.write_text(json.dumps({**template, "zero_optimization": {"stage": 3, "mics_shard_size": 2}}))
    with pytest.raises(HyperofaError, match="zero_optimization.mics_shard_size"):
        dsconfig.load_template(str(old))
    with pytest.raises(HyperofaError, match="template not found"):
        dsconfig.template_path(str(tmp_path / "none.json"))


def test_removed_key_lists_match_the_installed_deepspeed():
    from deepspeed.runtime import config as ds

    assert set(dsconfig.REMOVED_TOP_LEVEL_KEYS) == set(ds._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert set(dsconfig.REMOVED_ZERO_KEYS) == set(ds._REMOVED_ZERO_CONFIG_KEYS)


def test_precision_auto_is_fp32_on_cpu_and_half_precision_needs_a_gpu():
    assert resolve_precision("auto", "cpu", "hypernet.precision") == "fp32"
    with pytest.raises(HyperofaError, match="hypernet.precision=bf16 needs a GPU"):
        resolve_precision("bf16", "cpu", "hypernet.precision")
