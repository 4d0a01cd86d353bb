import json
import os

import pytest

from hyperofa_dist.formats.files import atomic_write_bytes, digest, file_record, fingerprint_dir, sha256_bytes
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.errors import HyperofaError


def test_atomic_write_leaves_no_temporary(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "x.bin", b"hello")
    assert path.read_bytes() == b"hello"
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_digest_is_order_independent():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_stage_lifecycle(tmp_path):
    stage = Stage(tmp_path, "prepare")
    inputs = {"corpus": "x", "config": {"k": 1}}
    assert not stage.is_complete(digest(inputs))
    with pytest.raises(HyperofaError, match="stage 'prepare' has not completed"):
        stage.require()
    stage.begin(digest(inputs))
    atomic_write_bytes(stage.path / "out" / "a.bin", b"abc")
    (stage.path / ".b.tmp-host-1").write_bytes(b"debris")
    manifest = stage.write_manifest(config={"k": 1}, inputs=inputs, outputs=["out/a.bin"], counts={"n": 1})
    assert stage.is_complete(digest(inputs))
    assert manifest["outputs"] == [{"path": "out/a.bin", "bytes": 3, "sha256": sha256_bytes(b"abc")}]
    assert json.loads(stage.manifest_path.read_text()) == manifest
    # other inputs: begin() removes the stale manifest and the debris before anything is rewritten
    other = digest({"corpus": "y"})
    assert not stage.is_complete(other)
    stage.begin(other)
    assert stage.manifest() is None
    assert not (stage.path / ".b.tmp-host-1").exists()


def test_fingerprints(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "other.txt").write_text("x")
    assert set(fingerprint_dir(tmp_path)) == {"tokenizer.json", "other.txt"}
    assert set(fingerprint_dir(tmp_path, ["tokenizer.json", "absent"])) == {"tokenizer.json"}
    assert file_record(tmp_path / "other.txt", tmp_path)["bytes"] == 1
    with pytest.raises(HyperofaError, match="directory not found"):
        fingerprint_dir(tmp_path / "nope")
    os.remove(tmp_path / "other.txt")


def test_fingerprint_path_covers_companion_files(tmp_path):
    from hyperofa_dist.formats.files import fingerprint_path

    main = tmp_path / "w.kv"
    main.write_bytes(b"kv")
    (tmp_path / "w.kv.vectors.npy").write_bytes(b"1")
    first = fingerprint_path(main)
    (tmp_path / "w.kv.vectors.npy").write_bytes(b"2")
    assert fingerprint_path(main) != first
    with pytest.raises(HyperofaError, match="file not found"):
        fingerprint_path(tmp_path / "absent.kv")
