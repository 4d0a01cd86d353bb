"""`hyperofa bench pretrain-sweep --dry-run`: every lever runs end to end at a toy shape, on the import path a bare
GPU machine has (no Ray, MLflow or webdataset), and each configuration's record adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

BLOCKER = '''
import sys

class _Absent:
    """Ray, MLflow and webdataset are not installed on the GPU machine: importing them must fail here too."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "webdataset"):
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, _Absent())
'''


def test_dry_run_sweeps_every_lever_without_ray_mlflow_or_webdataset(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "hyperofa_dist.bench.sweep", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    records, summary = lines[:-1], lines[-1]
    names = [r["configuration"] for r in records]
    assert names == ["default", "pad64", "sdpa", "fused_adamw", "device_checks", "dense_lookup_grad", "gpu_masks",
                     "zero1", "micro_batch_1", "micro_batch_4", "combined"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.json" for n in names)
    for record in records:
        assert json.loads((out / f"{record['configuration']}.json").read_text()) == record
        phases = record["phases_s_per_step"]
        assert set(phases) == {"data", "forward", "backward", "step", "sync"}
        assert sum(phases.values()) == pytest.approx(record["seconds_per_step"], rel=0.05)
        assert record["tokens_per_s"] > 0 and record["peak_memory_gib"] > 0 and record["dry_run"]
        # tokens per optimizer step are held fixed while the micro-batch changes
        assert record["micro_batch_size"] * record["grad_accum"] * record["seq_len"] == 2 * 2 * 64
    by_name = {r["configuration"]: r for r in records}
    assert by_name["pad64"]["vocab_rows"] == 3008 and by_name["default"]["vocab_rows"] == 3000
    assert by_name["zero1"]["zero"] == "zero1" and by_name["combined"]["lever"]["fused"]
    assert by_name["device_checks"]["phases_s_per_step"]["sync"] == 0.0
    assert summary["bench"] == "pretrain-sweep" and summary["configurations"] == 11
    assert summary["fastest"] in names and summary["dry_run"] is True
