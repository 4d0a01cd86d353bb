"""The demo's generated world is the same on every build, so the demo prints the same numbers every time."""

import json

import pytest

from hyperofa_dist.synthetic.demo import WorldSpec, build_world


@pytest.mark.slow
def test_world_builds_byte_identically(tmp_path):
    spec = WorldSpec(seed=3, n_concepts=120, source_sentences=600, target_sentences=200, retrieval_pairs=20,
                     source_vocab=400, pretrain_steps=5)
    first = build_world(tmp_path / "a", spec)
    second = build_world(tmp_path / "b", spec)
    a = {o["path"]: o["sha256"] for o in json.loads((first.root / "manifest.json").read_text())["outputs"]}
    b = {o["path"]: o["sha256"] for o in json.loads((second.root / "manifest.json").read_text())["outputs"]}
    assert a == b
    assert "source_model/model.safetensors" in a and "source_tokenizer/tokenizer.json" in a
    assert len([p for p in a if p.startswith("corpus/")]) == 7
    # a second build of the same spec finds the world up to date and rewrites nothing
    mtime = (first.root / "manifest.json").stat().st_mtime_ns
    build_world(tmp_path / "a", spec)
    assert (first.root / "manifest.json").stat().st_mtime_ns == mtime
