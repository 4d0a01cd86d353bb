"""`hyperofa bench init`: OFA assembly at XLM-R-to-Glot500 scale on generated inputs.

Scale (the HyperOFA report's XLM-R to Glot500 setting, §4 and Table 2): V_t 401,145; V_s 250,002 of which 103k
have words; word dim 200; k 400; 255k copied target tokens; about 85k covered new tokens to predict; the rest
random. The inputs are a generated mapping directory written by the mapping format's own writer, then a fresh
process reads it as the init stage does (memory-mapped) and runs the measured part: column statistics of F_s, mean word vectors, the chunked top-k OFA search and the assembly of F_t.
Its wall time and peak RSS are reported. The baseline, measured in the same run, is the reference algorithm
(dense float64 cosine of a batch against every source token, argpartition per row) on a sample of tokens,
extrapolated linearly to all tokens predicted.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.mapping import MappingParts, Postings, load_mapping, stage_of, write_mapping


@dataclass
class BenchScale:
    target_vocab: int = 401_145
    source_vocab: int = 250_002
    source_covered: int = 103_000
    copied: int = 255_000
    predicted: int = 85_000
    n_words: int = 400_000
    word_dim: int = 200
    k: int = 400
    mean_postings: int = 8
    baseline_tokens: int = 1024  # one reference batch, so its per-batch normalisation is counted once per 1024


def _postings(rng: np.random.Generator, vocab: int, covered: np.ndarray, n_words: int, mean: int):
    lengths = np.zeros(vocab, dtype=np.int64)
    lengths[covered] = np.minimum(rng.geometric(1.0 / mean, len(covered)), 256)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_words, int(indptr[-1]), dtype=np.int32)
    return indptr, indices


def generate_inputs(root: Path, scale: BenchScale, seed: int = 0) -> None:
    """A mapping directory under root (`root/mapping/`) with a manifest, the word table streamed in chunks."""
    rng = np.random.default_rng(seed)
    f_s = (rng.standard_normal((scale.source_vocab, scale.k), dtype=np.float32) / np.sqrt(scale.source_vocab))
    s_covered = np.sort(rng.choice(scale.source_vocab, scale.source_covered, replace=False))
    s_indptr, s_indices = _postings(rng, scale.source_vocab, s_covered, scale.n_words, scale.mean_postings)
    order = rng.permutation(scale.target_vocab)
    copied = np.sort(order[: scale.copied])
    new_covered = np.sort(order[scale.copied : scale.copied + scale.predicted])
    # copied tokens have words too (they are real pieces); only the new covered ones are predicted
    t_covered = np.union1d(copied[: scale.copied // 2], new_covered)
    t_indptr, t_indices = _postings(rng, scale.target_vocab, t_covered, scale.n_words, scale.mean_postings)
    chunk = 1 << 16
    words = (
        rng.standard_normal((min(a + chunk, scale.n_words) - a, scale.word_dim), dtype=np.float32)
        for a in range(0, scale.n_words, chunk)
    )
    stage = stage_of(root)
    stage.begin("bench")
    parts = MappingParts(
        source_postings=Postings(s_indptr, s_indices),
        target_postings=Postings(t_indptr, t_indices),
        overlap_target=copied,
        overlap_source=rng.integers(0, scale.source_vocab, len(copied)),
        overlap_kinds=np.ones(len(copied), dtype=np.int8),
        split={"train": s_covered, "val": s_covered[:0], "test": s_covered[:0]},
        coordinates=f_s,
        primitives=np.eye(scale.k, dtype=np.float32),
        words=[f"qaa:w{i}" for i in range(scale.n_words)],
    )
    outputs = write_mapping(stage.path, parts, words, scale.word_dim, "generated")
    stage.write_manifest(config={}, inputs={"bench": asdict(scale), "seed": seed}, outputs=outputs,
                         counts={"k": scale.k})


def _measured(root: str, settings: dict[str, Any], seed: int, queue: Any) -> None:
    """The measured run, in a fresh process so peak RSS is the assembly's own."""
    from ..method.assemble import assemble_coordinates, provenance_counts
    from ..method.ofa import ofa_for_tokens
    from ..method.random import column_stats

    start = time.perf_counter()
    mapping = load_mapping(root)
    f_s, words, source, target = (
        mapping.source_coordinates, mapping.word_vectors, mapping.source_postings, mapping.target_postings
    )
    copy_t, copy_s = mapping.overlap_target, mapping.overlap_source
    vocab = target.vocab_size
    phases = {"load": time.perf_counter() - start}
    mean, std = column_stats(f_s)
    predict = np.setdiff1d(target.covered(), copy_t)
    phases["stats"] = time.perf_counter() - start - sum(phases.values())
    rows = ofa_for_tokens(target, source, words, f_s, predict, **settings)
    phases["ofa"] = time.perf_counter() - start - sum(phases.values())
    assembly = assemble_coordinates(vocab, f_s, copy_t, copy_s, predict, rows, "ofa", mean, std, seed)
    phases["assemble"] = time.perf_counter() - start - sum(phases.values())
    seconds = time.perf_counter() - start
    counts = provenance_counts(assembly.provenance)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put({
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # includes imports; tells load from work on a shared machine
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB -> GiB
        "tokens_predicted": int(len(predict)),
        "counts": counts,
        "phases": {name: round(v, 2) for name, v in phases.items()},
    })


def _baseline(root: str, n_tokens: int, top_k: int, temperature: float, queue: Any) -> None:
    """The reference algorithm (docs/METHOD.md §2) on n_tokens: dense float64 cosine to every source token + argpartition."""
    from ..method.ofa import token_mean_vectors

    mapping = load_mapping(root)
    f_s, words = mapping.source_coordinates, mapping.word_vectors
    s_indptr, s_indices = mapping.source_postings.indptr, mapping.source_postings.indices
    t_indptr, t_indices = mapping.target_postings.indptr, mapping.target_postings.indices
    sample = np.setdiff1d(mapping.target_postings.covered(), mapping.overlap_target)[:n_tokens]
    # the reference holds e_s for the whole source vocabulary as float64 (zeros for uncovered tokens)
    e_s = token_mean_vectors(s_indptr, s_indices, words, np.arange(len(s_indptr) - 1)).astype(np.float64)
    e_t = token_mean_vectors(t_indptr, t_indices, words, sample).astype(np.float64)
    start = time.perf_counter()
    norms_s = np.linalg.norm(e_s, axis=1)
    norms_s[norms_s == 0] = 1.0
    for a in range(0, len(sample), 1024):
        batch = e_t[a : a + 1024]
        sims = (batch / np.linalg.norm(batch, axis=1, keepdims=True)) @ (e_s / norms_s[:, None]).T
        for row in sims:
            top = np.argpartition(row, -top_k)[-top_k:]
            top = top[np.argsort(-row[top])]
            w = np.exp(row[top] / temperature)
            _ = (w / w.sum()) @ f_s[top]
    queue.put({"seconds": time.perf_counter() - start, "tokens": int(len(sample))})


def _in_child(target, *args) -> dict[str, Any]:
    import queue as queues

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies (import error, OOM kill) must fail the bench, not hang it
        try:
            result = queue.get(timeout=2)
            break
        except queues.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child exited with status {proc.exitcode} before reporting")
    proc.join()
    return result


def run_bench(scale: BenchScale, settings: dict[str, Any], workdir: Path, seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    generate_inputs(workdir, scale, seed)
    generate_s = time.perf_counter() - t0
    measured = _in_child(_measured, str(workdir), settings, seed)
    base = _in_child(_baseline, str(workdir), scale.baseline_tokens, settings["top_k"], settings["temperature"])
    per_token = base["seconds"] / max(base["tokens"], 1)
    return {
        "bench": "init",
        "seconds": round(measured["seconds"], 2),
        "cpu_seconds": round(measured["cpu_seconds"], 1),
        "phases_seconds": measured["phases"],
        "peak_rss_gib": round(measured["peak_rss_gib"], 3),
        "tokens_predicted": measured["tokens_predicted"],
        "provenance": measured["counts"],
        "baseline_dense_f64_seconds_extrapolated": round(per_token * measured["tokens_predicted"], 3),
        "baseline_tokens_measured": base["tokens"],
        "speedup_vs_baseline": round(per_token * measured["tokens_predicted"] / max(measured["seconds"], 1e-9), 2),
        "generate_seconds": round(generate_s, 1),
        "scale": asdict(scale),
        "settings": settings,
        "targets": {"seconds": 180, "peak_rss_gib": 4},
    }


def run(config: Any, args: Any) -> int:
    from ..method.ofa import ofa_settings

    c = config.init
    settings = ofa_settings(config)
    seed = c.seed if c.seed is not None else config.run.seed
    if getattr(args, "workdir", None):
        result = run_bench(BenchScale(), settings, Path(args.workdir), seed)
    else:
        with tempfile.TemporaryDirectory(prefix="hyperofa-bench-init-") as tmp:
            result = run_bench(BenchScale(), settings, Path(tmp), seed)
    print(json.dumps(result, sort_keys=True))
    return 0
