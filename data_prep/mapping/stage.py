"""`hyperofa mapping`: the hypernetwork's training data in `<run_dir>/mapping/` (formats/mapping.py).

Reads the word vectors, the source model (tokenizer + input embeddings, and an untied causal LM's output
projection) and the target tokenizer; writes the copy pairs (overlap), the factorisation F_s / P, token -> word
postings of both tokenizers (Ray), the word table, the train/val/test split of covered source tokens, coverage
statistics, and the manifest last.

An untied causal LM (Llama, Mistral) has two matrices with a row per token. One factorisation of the two side by
side, [E_in | E_out] (each scaled to the same row norm first), gives one coordinate row per token, which one
hypernetwork learns and OFA combines; P [k, 2D] maps it back to both (docs/METHOD.md §1.4, §8 for the measured
choice against two factorisations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyperofa_dist.config import Config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.factorize import check_rank, factorize
from hyperofa_dist.formats.files import fingerprint_path
from hyperofa_dist.formats.mapping import FORMAT_VERSION, STAGE, STATS, WORD_CHUNK_ROWS, MappingParts, write_mapping
from hyperofa_dist.formats.models import load_source, source_identity, source_rows_fit
from hyperofa_dist.formats.rundir import Stage
from hyperofa_dist.formats.tokenizer import ignored_settings, load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
from hyperofa_dist.formats.vectors import load_word_vectors, resolve_vectors_path
from hyperofa_dist.runtime.ray import ray_session
from hyperofa_dist.runtime.stage import StageShell
from hyperofa_dist.tracking import numeric_metrics
from hyperofa_dist.vocab import compute_overlap, same_vocabulary, special_ids

from .postings import build_postings, coverage_stats
from .split import split_tokens


def source_embeddings(config: Config):
    """(tokenizer, E_s float32 [V_s, D] or, for an untied causal LM, [V_s, 2D] = [E_in | E_out], matrices 1 or 2).

    A masked LM's rows and tokens must agree, as the method asserts. A causal LM may have more rows than tokens
    (Qwen2 rounds its matrix up): rows beyond the tokenizer belong to no token and are left out."""
    source = load_source(config)
    tokenizer = source.tokenizer
    embeddings = source.input_embeddings()
    matrices = 1
    if source.untied:
        embeddings = np.concatenate([embeddings, source.output_embeddings()], axis=1)
        matrices = 2
    kind = source.kind
    del source
    rows = embeddings.shape[0]
    if not source_rows_fit(len(tokenizer), rows, kind):
        raise HyperofaError(
            f"source tokenizer has {len(tokenizer)} tokens but the model {config.source.model} has "
            f"{rows} embedding rows; they must be the same (source.tokenizer / source.model)"
        )
    return tokenizer, np.ascontiguousarray(embeddings[: len(tokenizer)]), matrices


@dataclass
class Computed:
    """Everything the mapping is made of, computed before the stage directory is touched."""

    source_tok: Any
    target_tok: Any
    identical: bool  # the target tokenizer is the source's: nothing to initialise
    words: Any  # formats.vectors.WordVectors
    overlap: Any  # vocab.Overlap
    factors: Any  # factorize.Factors
    hidden: int  # D, per matrix
    matrices: int  # 1, or 2 for an untied causal LM (input and output rows side by side)
    source_postings: Any
    target_postings: Any
    split: dict[str, np.ndarray]
    timings: dict[str, float]


def compute(config: Config, shell: StageShell, vectors_path: Any, target_dir: Any) -> Computed:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    source_tok, embeddings, matrices = source_embeddings(config)
    check_rank(config.mapping.num_primitives, embeddings.shape)
    target_tok = load_tokenizer(target_dir)
    identical = same_vocabulary(source_tok, target_tok)
    if identical:
        shell.say(f"warning: the target tokenizer {target_dir} is identical to the source tokenizer: nothing to initialise")
    words = load_word_vectors(vectors_path, config.vectors.languages)
    timings["load_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    overlap = compute_overlap(target_tok, source_tok)
    timings["overlap_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    factors = factorize(embeddings, config.mapping.num_primitives, blocks=matrices)
    timings["factorize_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    with ray_session(config):
        source_postings, target_postings = build_postings(
            [source_tok, target_tok], words.keys, config.mapping.words_per_task, config.mapping.max_retries
        )
    timings["postings_s"] = time.perf_counter() - clock

    covered = source_postings.covered()
    trainable = covered[~np.isin(covered, sorted(special_ids(source_tok)))]  # specials are copied by role, never predicted
    seed = config.mapping.split_seed if config.mapping.split_seed is not None else config.run.seed
    split = split_tokens(trainable, config.mapping.split, seed)
    return Computed(source_tok, target_tok, identical, words, overlap, factors, int(embeddings.shape[1]) // matrices,
                    matrices, source_postings, target_postings, split, timings)


def mapping_stats(c: Computed) -> dict[str, Any]:
    words = c.words
    return {
        "words": {
            "keys": words.n_keys,
            "kept": len(words),
            "skipped_unexpected_format": words.skipped,
            "skipped_examples": words.skipped_examples,
            "languages": len(words.languages),
            "dim": words.dim,
        },
        "overlap": c.overlap.stats,
        "factorization": {
            "k": c.factors.k,
            "D": c.hidden,
            "matrices": c.matrices,
            "factorized": c.factors.factorized,
            "relative_reconstruction_error": c.factors.relative_error,
        },
        "source": coverage_stats(c.source_postings, words.lang_ids, words.languages, special_ids(c.source_tok)),
        "target": coverage_stats(c.target_postings, words.lang_ids, words.languages, special_ids(c.target_tok)),
        "split": {name: int(ids.size) for name, ids in c.split.items()},
        "target_identical_to_source": c.identical,
    }


def run(config: Config, tracker: Any) -> int:
    vectors_path = resolve_vectors_path(config)
    target_dir = target_tokenizer_dir(config)
    inputs = {
        # The vectors' content, not their location: a moved run directory (or vectors file) stays up to date.
        "vectors": {"fingerprint": fingerprint_path(vectors_path)},
        "source": source_identity(config),
        "target_tokenizer": tokenizer_fingerprint(target_dir),
        "k": config.mapping.num_primitives,
        "config": config.fingerprint("mapping", "run", "vectors.languages"),
        "format": FORMAT_VERSION,
    }
    with StageShell.open(config, tracker, STAGE, Stage(config.run_dir, STAGE), inputs) as shell:
        if shell.up_to_date:
            return 0
        c = compute(config, shell, vectors_path, target_dir)
        words, overlap, factors = c.words, c.overlap, c.factors
        stats = mapping_stats(c)
        shell.begin()
        parts = MappingParts(
            source_postings=c.source_postings, target_postings=c.target_postings, overlap_target=overlap.target_ids,
            overlap_source=overlap.source_ids, overlap_kinds=overlap.kinds, split=c.split,
            coordinates=factors.coordinates, primitives=factors.primitives, words=words.keys, stats=stats,
        )
        word_blocks = (words.matrix(start, start + WORD_CHUNK_ROWS) for start in range(0, len(words), WORD_CHUNK_ROWS))
        outputs = write_mapping(shell.path, parts, word_blocks, words.dim, vectors_path)
        counts = {
            "V_s": len(c.source_tok), "V_t": len(c.target_tok), "D": c.hidden, "matrices": c.matrices, "k": factors.k,
            "n_words": len(words), "word_dim": words.dim, "overlap_pairs": len(overlap),
            "source_covered": stats["source"]["covered"], "target_covered": stats["target"]["covered"],
            **{f"split_{name}": n for name, n in stats["split"].items()},
        }
        tokenizers = {"source": config.source.tokenizer or config.source.model, "target": target_dir}
        shell.finish(outputs=outputs, counts=counts,
                     extra={"factorized": factors.factorized, "timings": c.timings, "vectors_path": str(vectors_path),
                            **ignored_settings(tokenizers, shell.say)})
        shell.run.log_metrics(numeric_metrics(stats) | c.timings)
        shell.run.log_artifact(shell.path / STATS)
        shell.say(
            f"{len(words)} words; source {stats['source']['covered']}/{len(c.source_tok)} tokens covered, target "
            f"{stats['target']['covered']}/{len(c.target_tok)}; {len(overlap)} copy pairs; k={factors.k} "
            f"(error {factors.relative_error:.4f}) -> {shell.path}"
        )
    return 0
