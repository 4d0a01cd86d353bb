"""formats/jobdir.py's typed job specs: what a stage writes is what every rank reads, and a job file with a
missing, unknown or mistyped key is one line naming the file and the key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats.jobdir import DS_CONFIG, JOB, HypernetJobSpec, PretrainJobSpec, read_job, write_job

PRETRAIN = PretrainJobSpec(
    config={"run": {"seed": 1}}, out_dir="/r/pretrain/m", model_dir="/r/init/m/model", block_size=32,
    train_shards={"aaa_Latn": ["/r/prepare/train/a-0.tar"]}, heldout_shards={"aaa_Latn": []},
    train_blocks={"aaa_Latn": 12}, ds_config={"train_micro_batch_size_per_gpu": 2}, precision="fp32", resume=True,
    resume_tag="step00000004", trainable_rows=None, factors_dir=None, objective="causal",
    frame={"start": 1, "sep": 2, "pad": None}, provenance={"fingerprint": {}, "changes": []}, run_id=None,
)


def test_a_spec_comes_back_as_written_with_the_ds_config_beside_it(tmp_path):
    write_job(tmp_path, PRETRAIN)
    assert read_job(tmp_path / JOB, PretrainJobSpec) == PRETRAIN
    assert json.loads((tmp_path / DS_CONFIG).read_text()) == PRETRAIN.ds_config
    hypernet = HypernetJobSpec(config={}, out_dir=str(tmp_path), ds_config={}, run_id="abc", provenance=None)
    write_job(tmp_path, hypernet)
    assert read_job(tmp_path / JOB, HypernetJobSpec) == hypernet and hypernet.resume_tag is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        hypernet.resume = True  # type: ignore[misc]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("model_dir"), "key 'model_dir' missing from the job file"),
    (lambda d: d.update(block_size="32"), "key 'block_size' must be int, not '32'"),
    (lambda d: d.update(block_size=True), "key 'block_size' must be int, not True"),
    (lambda d: d.update(train_shards={"aaa_Latn": "/a.tar"}), "key 'train_shards' must be dict"),
    (lambda d: d.update(frame={"start": "1"}), "key 'frame' must be"),
    (lambda d: d.update(spare=1), "unknown key 'spare' in a PretrainJobSpec job file"),
])
def test_a_bad_key_is_one_line_naming_the_file_and_the_key(tmp_path, change, message):
    data = dataclasses.asdict(PRETRAIN)
    change(data)
    (tmp_path / JOB).write_text(json.dumps(data))
    with pytest.raises(HyperofaError) as error:
        read_job(tmp_path / JOB, PretrainJobSpec)
    assert str(error.value).startswith(f"{tmp_path / JOB}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_hypernet_job_file_is_not_a_pretrain_one(tmp_path):
    write_job(tmp_path, HypernetJobSpec(config={}, out_dir="/o", ds_config={}, run_id=None, provenance=None))
    with pytest.raises(HyperofaError, match="unknown key 'resume_tag'|key 'model_dir' missing"):
        read_job(tmp_path / JOB, PretrainJobSpec)
    (tmp_path / JOB).write_text("[1, 2]")
    with pytest.raises(HyperofaError, match="job file is not a JSON object"):
        read_job(tmp_path / JOB, HypernetJobSpec)
