"""Test helper for the init stage: a tiny source model, a larger target tokenizer over all generated languages,
and a `<run_dir>/mapping/` directory that follows the mapping contract (briefs: mapping_contract.md).

The word vectors are cross-lingual by construction: every word's vector is its concept's vector plus a little
noise, so translations are near each other, as ColexNet+ vectors are. Postings are built the way §1.5 says
(word, ' ' + word, capitalised variant), de-duplicated and sorted per token. Overlap, factorisation,
postings and the source identity come from the mapping stage's own functions; only Ray is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.mapping_stage import source_identity, split_tokens
from hyperofa_dist import synthetic
from hyperofa_dist.artifacts import Stage, atomic_write_bytes, fingerprint_path
from hyperofa_dist.config import load_config
from hyperofa_dist.factorize import factorize
from hyperofa_dist.target import tokenizer_fingerprint
from hyperofa_dist.vocab import compute_overlap, special_ids


@dataclass
class InitWorld:
    run_dir: Path
    source_model: Path
    target_tokenizer: Path
    vectors: Path
    family: str
    k: int
    hidden: int

    def overrides(self, *extra: str) -> list[str]:
        return [
            f"run.dir={self.run_dir}",
            f"source.model={self.source_model}",
            f"tokenizer.path={self.target_tokenizer}",
            "tracking.enabled=false",
            *extra,
        ]


def train_target_tokenizer(family: str, corpus: Path, out_dir: Path, vocab_size: int = 900) -> Path:
    texts = []
    for path in sorted(corpus.iterdir()):
        texts.extend(synthetic.read_lines(path, limit=400))
    return synthetic.train_source_tokenizer(family, texts, vocab_size, out_dir)


def word_table(world: synthetic.World, n_concepts: int = 250, dim: int = 16, seed: int = 0):
    """(keys 'iso:word', float32 vectors [n, dim]) for the first n_concepts concepts of every language."""
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((n_concepts, dim))
    keys, rows = [], []
    for lang in world.languages:
        for c in range(n_concepts):
            keys.append(f"{lang.code[:3]}:{world.lexicon[lang.code][c]}")  # ColexNet+-style iso:word
            rows.append(concepts[c] + 0.3 * rng.standard_normal(dim))
    return keys, np.asarray(rows, dtype=np.float32)


def postings(tokenizer, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The mapping stage's own builder, in-process (no Ray)."""
    from data_prep.postings import backend_encoder, build_local, tokenizer_json

    return build_local(backend_encoder(tokenizer_json(tokenizer)), keys, len(tokenizer), 4096)


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def write_mapping(
    run_dir: Path,
    source_model: Path,
    target_tokenizer: Path,
    world: synthetic.World,
    k: Optional[int] = None,
    seed: int = 0,
) -> tuple[Path, int]:
    """Write `<run_dir>/mapping/` for this source model and target tokenizer; returns (vectors file, k)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(str(source_model))
    s_tok = AutoTokenizer.from_pretrained(str(source_model))
    t_tok = AutoTokenizer.from_pretrained(str(target_tokenizer))
    with torch.no_grad():
        e_s = model.get_input_embeddings().weight.detach().numpy()[: len(s_tok)].copy()
    k = e_s.shape[1] if k is None else k
    keys, vectors = word_table(world, seed=seed)
    stage = Stage(run_dir, "mapping")
    stage.begin("fixture")
    out = stage.path
    # the word-vector "file" the mapping was built from, so its fingerprint can be recorded
    vectors_file = run_dir / "vectors.npy"
    _save_npy(vectors_file, vectors)
    _save_npy(out / "word_vectors.npy", vectors)
    atomic_write_bytes(out / "words.txt", ("\n".join(keys) + "\n").encode("utf-8"))
    s_indptr, s_indices = postings(s_tok, keys)
    t_indptr, t_indices = postings(t_tok, keys)
    _save_npz(out / "postings_source.npz", indptr=s_indptr, indices=s_indices)
    _save_npz(out / "postings_target.npz", indptr=t_indptr, indices=t_indices)
    factors = factorize(e_s, k)
    f_s, p = factors.coordinates, factors.primitives
    _save_npy(out / "coordinates_source.npy", f_s)
    _save_npy(out / "primitives.npy", p)
    overlap = compute_overlap(t_tok, s_tok)
    _save_npz(out / "overlap.npz", target_ids=overlap.target_ids, source_ids=overlap.source_ids, kinds=overlap.kinds)
    covered = np.flatnonzero(np.diff(s_indptr) > 0)
    trainable = covered[~np.isin(covered, sorted(special_ids(s_tok)))]
    _save_npz(out / "split.npz", **split_tokens(trainable, [0.8, 0.1, 0.1], seed))
    stats = {"source_covered": int(len(covered)), "target_covered": int((np.diff(t_indptr) > 0).sum())}
    atomic_write_bytes(out / "stats.json", json.dumps(stats).encode())
    inputs = {
        "vectors": {"path": str(vectors_file), "fingerprint": fingerprint_path(vectors_file)},
        "source": source_identity(load_config(None, [f"source.model={source_model}"])),
        "target_tokenizer": tokenizer_fingerprint(target_tokenizer),
        "k": k,
    }
    counts = {"V_s": len(s_tok), "V_t": len(t_tok), "D": e_s.shape[1], "k": k, "n_words": len(keys),
              "word_dim": vectors.shape[1]}
    names = ["word_vectors.npy", "words.txt", "postings_source.npz", "postings_target.npz",
             "coordinates_source.npy", "primitives.npy", "overlap.npz", "split.npz", "stats.json"]
    stage.write_manifest(config={}, inputs=inputs, outputs=names, counts=counts,
                         extra={"factorized": k != e_s.shape[1]})
    return vectors_file, k


def make_init_world(
    root: Path,
    family: str,
    source_tokenizer: Path,
    corpus: Path,
    world: synthetic.World,
    k: Optional[int] = None,
    hidden: int = 32,
    target_vocab: int = 900,
) -> InitWorld:
    root = Path(root)
    source_model = synthetic.make_tiny_model(family, source_tokenizer, root / "source_model", hidden_size=hidden)
    target = train_target_tokenizer(family, corpus, root / "target_tokenizer", target_vocab)
    run_dir = root / "run"
    vectors, k = write_mapping(run_dir, source_model, target, world, k=k)
    return InitWorld(run_dir, source_model, target, vectors, family, k, hidden)


# One world per (family, k, target vocab) for the whole session: building one costs seconds, tests only read it
# (tests that write under the run dir use `fresh_run`).
_WORLDS: dict[tuple, InitWorld] = {}


def shared_world(tmp_path_factory, source_tokenizers, small_corpus, world, family: str, k: Optional[int] = None,
                 target_vocab: int = 900) -> InitWorld:
    key = (family, k, target_vocab)
    if key not in _WORLDS:
        root = tmp_path_factory.mktemp(f"init_{family}_{k}")
        _WORLDS[key] = make_init_world(root, family, source_tokenizers[family], small_corpus, world, k=k,
                                       target_vocab=target_vocab)
    return _WORLDS[key]


def fresh_run(base: InitWorld, run_dir: Path) -> InitWorld:
    """A copy of a world's run directory (mapping only) that a test may extend or break."""
    import shutil

    shutil.copytree(base.run_dir / "mapping", run_dir / "mapping")
    return InitWorld(run_dir, base.source_model, base.target_tokenizer, base.vectors, base.family, base.k, base.hidden)


def write_hypernet(run_dir: Path, ids: np.ndarray, rows: np.ndarray, test_ids=None, test_rows=None) -> None:
    """A hypernet stage output as the init stage reads it (predicted target coordinates, test-split predictions)."""
    from hyperofa_dist.init import inputs

    stage = Stage(run_dir, "hypernet")
    stage.begin("fixture")
    _save_npy(stage.path / inputs.PREDICTION_IDS, np.asarray(ids))
    _save_npy(stage.path / inputs.PREDICTION_ROWS, np.asarray(rows))
    names = [inputs.PREDICTION_IDS, inputs.PREDICTION_ROWS]
    if test_ids is not None:
        _save_npy(stage.path / inputs.TEST_PREDICTION_IDS, np.asarray(test_ids))
        _save_npy(stage.path / inputs.TEST_PREDICTION_ROWS, np.asarray(test_rows))
        names += [inputs.TEST_PREDICTION_IDS, inputs.TEST_PREDICTION_ROWS]
    stage.write_manifest(config={}, inputs={"fixture": True}, outputs=names)


@dataclass
class Exported:
    source: object
    source_tok: object
    target_tok: object
    mapping: object
    copy_t: np.ndarray
    copy_s: np.ndarray
    coordinates: np.ndarray
    model: object
    info: object


def export_copy_random(w: InitWorld, out_dir: Path, pad: Optional[int] = None, seed: int = 0) -> Exported:
    """Assemble F_t from copies and random rows only and export the expanded model of `w` into out_dir."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hyperofa_dist.init import assemble as asm
    from hyperofa_dist.init.export import build_expanded_model, merge_copy_pairs, save_expanded_model, special_token_pairs
    from hyperofa_dist.init.inputs import load_mapping
    from hyperofa_dist.init.random import column_stats

    source = AutoModelForMaskedLM.from_pretrained(str(w.source_model)).eval()
    s_tok = AutoTokenizer.from_pretrained(str(w.source_model))
    t_tok = AutoTokenizer.from_pretrained(str(w.target_tokenizer))
    mapping = load_mapping(w.run_dir)
    st, ss, _ = special_token_pairs(s_tok, t_tok)
    copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, st, ss)
    mean, std = column_stats(mapping.source_coordinates)
    a = asm.assemble_coordinates(len(t_tok), mapping.source_coordinates, copy_t, copy_s, None, None, None, mean, std,
                                 seed)
    e_t = asm.full_embeddings(a.coordinates, mapping.primitives)
    model, info = build_expanded_model(source, s_tok, t_tok, e_t, copy_t, copy_s, pad_to_multiple_of=pad)
    save_expanded_model(model, t_tok, out_dir)
    return Exported(source, s_tok, t_tok, mapping, copy_t, copy_s, a.coordinates, model, info)
