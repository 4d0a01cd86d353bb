"""`hyperofa mapping`: the hypernetwork's training data in `<run_dir>/mapping/` (layout: README, "mapping").

Reads the word vectors, the source model (tokenizer + input embeddings) and the target tokenizer; writes the
copy pairs (overlap), the factorisation F_s / P, token -> word postings of both tokenizers (Ray), the word
table, the train/val/test split of covered source tokens, coverage statistics, and the manifest last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from hyperofa_dist.artifacts import Stage, atomic_write_bytes, atomic_write_json, digest, fingerprint_dir, fingerprint_path
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.factorize import check_rank, factorize
from hyperofa_dist.vectors import load_word_vectors, resolve_vectors_path, write_word_matrix
from hyperofa_dist.vocab import compute_overlap, same_vocabulary, special_ids

from .postings import build_postings_ray, coverage_stats, write_npz

log = logging.getLogger("hyperofa.mapping")

STAGE = "mapping"
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def split_tokens(covered: np.ndarray, shares: list[float], seed: int) -> dict[str, np.ndarray]:
    """Train/val/test ids: sorted before a seeded shuffle (order-independent); test takes the rounding rest."""
    ids = np.sort(np.asarray(covered, dtype=np.int64))
    order = np.random.default_rng(seed).permutation(ids.size)
    shuffled = ids[order]
    n_train = int(shares[0] * ids.size)
    n_val = int(shares[1] * ids.size)
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def source_identity(config) -> dict[str, Any]:
    """The source model's identity for the manifest: file hashes when local, the hub name otherwise."""
    out: dict[str, Any] = {"model": config.source.model, "tokenizer": config.source.tokenizer}
    for key, where in (("model_files", config.source.model), ("tokenizer_files", config.source.tokenizer)):
        if where and Path(where).is_dir():
            out[key] = fingerprint_dir(where, MODEL_FILES if key == "model_files" else None)
    return out


def load_source(config):
    """(tokenizer, E_s float32 [V_s, D]) of the source model; sizes must agree as the method asserts."""
    from transformers import AutoModelForMaskedLM

    from hyperofa_dist.target import load_tokenizer

    tokenizer = load_tokenizer(config.source.tokenizer or config.source.model)
    try:
        model = AutoModelForMaskedLM.from_pretrained(config.source.model)
    except Exception as exc:  # transformers raises many types for a missing or broken model
        raise HyperofaError(
            f"config key source.model={config.source.model}: cannot load the model ({exc.__class__.__name__}: {str(exc)[:160]})"
        ) from None
    embeddings = model.get_input_embeddings().weight.detach().float().numpy().copy()
    del model
    if embeddings.shape[0] != len(tokenizer):
        raise HyperofaError(
            f"source tokenizer has {len(tokenizer)} tokens but the model {config.source.model} has "
            f"{embeddings.shape[0]} embedding rows; they must be the same (source.tokenizer / source.model)"
        )
    return tokenizer, embeddings


def run_mapping_stage(config, tracker) -> int:
    from hyperofa_dist.raycluster import ray_session
    from hyperofa_dist.target import load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint

    k = config.mapping.num_primitives
    vectors_path = resolve_vectors_path(config)
    target_dir = target_tokenizer_dir(config)
    inputs = {
        "vectors": {"path": str(vectors_path), "fingerprint": fingerprint_path(vectors_path)},
        "source": source_identity(config),
        "target_tokenizer": tokenizer_fingerprint(target_dir),
        "k": k,
        "config": config.section("mapping", "vectors") | {"seed": config.run.seed},
    }
    inputs["config"]["vectors"] = {key: v for key, v in inputs["config"]["vectors"].items() if key != "train"}
    stage = Stage(config.run_dir, STAGE)
    key = digest(inputs)
    with tracker.stage(STAGE, config) as t:
        if stage.is_complete(key):
            log.info("mapping: %s is up to date", stage.path)
            return 0
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        source_tok, embeddings = load_source(config)
        check_rank(k, embeddings.shape)
        target_tok = load_tokenizer(target_dir)
        identical = same_vocabulary(source_tok, target_tok)
        if identical:
            log.warning("mapping: the target tokenizer %s is identical to the source tokenizer: nothing to initialise", target_dir)
        words = load_word_vectors(vectors_path, config.vectors.languages)
        timings["load_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        overlap = compute_overlap(target_tok, source_tok)
        timings["overlap_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        factors = factorize(embeddings, k)
        timings["factorize_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        with ray_session(config):
            (src_indptr, src_indices), (tgt_indptr, tgt_indices) = build_postings_ray(
                [source_tok, target_tok], words.keys, config.mapping.words_per_task, config.mapping.max_retries
            )
        timings["postings_s"] = time.perf_counter() - clock

        source_specials = special_ids(source_tok)
        covered = np.flatnonzero(np.diff(src_indptr) > 0)
        trainable = covered[~np.isin(covered, sorted(source_specials))]  # specials are copied by role, never predicted
        seed = config.mapping.split_seed if config.mapping.split_seed is not None else config.run.seed
        split = split_tokens(trainable, config.mapping.split, seed)

        stats = {
            "words": {
                "keys": words.n_keys,
                "kept": len(words),
                "skipped_unexpected_format": words.skipped,
                "skipped_examples": words.skipped_examples,
                "languages": len(words.languages),
                "dim": words.dim,
            },
            "overlap": overlap.stats,
            "factorization": {
                "k": factors.k,
                "D": int(embeddings.shape[1]),
                "factorized": factors.factorized,
                "relative_reconstruction_error": factors.relative_error,
            },
            "source": coverage_stats(src_indptr, src_indices, words.lang_ids, words.languages, source_specials),
            "target": coverage_stats(tgt_indptr, tgt_indices, words.lang_ids, words.languages, special_ids(target_tok)),
            "split": {name: int(ids.size) for name, ids in split.items()},
            "target_identical_to_source": identical,
        }

        stage.begin(key)
        root = stage.path
        write_npz(root / "postings_source.npz", indptr=src_indptr, indices=src_indices)
        write_npz(root / "postings_target.npz", indptr=tgt_indptr, indices=tgt_indices)
        write_npz(root / "overlap.npz", target_ids=overlap.target_ids, source_ids=overlap.source_ids, kinds=overlap.kinds)
        write_npz(root / "split.npz", **split)
        _save_npy(root / "coordinates_source.npy", factors.coordinates)
        _save_npy(root / "primitives.npy", factors.primitives)
        write_word_matrix(words, root / "word_vectors.npy")
        atomic_write_bytes(root / "words.txt", ("\n".join(words.keys) + "\n").encode("utf-8"))
        atomic_write_json(root / "stats.json", stats)
        outputs = [
            "postings_source.npz", "postings_target.npz", "overlap.npz", "split.npz", "coordinates_source.npy",
            "primitives.npy", "word_vectors.npy", "words.txt", "stats.json",
        ]
        counts = {
            "V_s": len(source_tok),
            "V_t": len(target_tok),
            "D": int(embeddings.shape[1]),
            "k": factors.k,
            "n_words": len(words),
            "word_dim": words.dim,
            "overlap_pairs": len(overlap),
            "source_covered": stats["source"]["covered"],
            "target_covered": stats["target"]["covered"],
            **{f"split_{name}": n for name, n in stats["split"].items()},
        }
        stage.write_manifest(
            config=config.effective(), inputs=inputs, outputs=outputs, counts=counts,
            extra={"factorized": factors.factorized},
        )
        t.log_metrics(_flat_numbers(stats) | timings)
        t.log_artifact(root / "stats.json")
        log.info(
            "mapping: %d words; source %d/%d tokens covered, target %d/%d; %d copy pairs; k=%d (error %.4f) -> %s",
            len(words), stats["source"]["covered"], len(source_tok), stats["target"]["covered"], len(target_tok),
            len(overlap), factors.k, factors.relative_error, root,
        )
    return 0


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as MLflow metric names (`source.length_percentiles.50`); booleans as 0/1."""
    out: dict[str, float] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, key + "."))
        elif isinstance(value, (bool, int, float, np.integer, np.floating)):
            out[key] = float(value)
    return out
