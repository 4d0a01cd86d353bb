"""`hyperofa init`: mapping (+ hypernetwork predictions) -> `<run_dir>/init/<method>/`.

Outputs: `F_t.npy` (target coordinates), `P.npy` (the source primitives, reused), `provenance.npy` (uint8 per target
token: 0 copy, 1 hyperofa, 2 ofa, 3 random), `provenance_counts.json` (overall, per language and per script of the
tokens' words), `quality.json` (held-out cosine per method), `model/` (stock HF masked LM + target tokenizer) and
the manifest. Every input is validated before the stage directory is touched, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_prep.mapping_stage import source_identity

from ..artifacts import Stage, atomic_write_json, digest, tmp_name
from ..config import Config
from ..errors import HyperofaError
from ..target import load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
from . import assemble as asm
from .export import build_expanded_model, merge_copy_pairs, save_expanded_model, special_token_pairs
from .inputs import (
    Mapping,
    check_mapping_matches,
    check_source_identity,
    load_mapping,
    load_predictions,
    load_test_predictions,
)
from .ofa import ofa_for_tokens, resolve_device
from .random import column_stats, random_rows

STAGE = "init"


def init_seed(config: Config) -> int:
    return config.init.seed if config.init.seed is not None else config.run.seed


def _load_source(config: Config):
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(config.source.model)
    except Exception as exc:  # hub/network/format errors of many types
        raise HyperofaError(
            f"source.model {config.source.model}: cannot load ({exc.__class__.__name__}: {str(exc)[:160]})"
        ) from None
    tokenizer = load_tokenizer(config.source.tokenizer or config.source.model)
    return model, tokenizer


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _ofa_settings(config: Config) -> dict[str, Any]:
    c = config.init
    return dict(top_k=c.top_k, temperature=c.temperature, chunk_size=c.chunk_size, device=resolve_device(c.device))


def covered_new_tokens(mapping: Mapping, copied: np.ndarray) -> np.ndarray:
    """Target tokens with words that are not copied: the set HyperOFA predicts and OFA initialises (§2)."""
    covered = np.flatnonzero(np.diff(mapping.target_postings[0]) > 0)
    return np.setdiff1d(covered, copied)


def heldout_quality(
    mapping: Mapping, config: Config, mean: np.ndarray, std: np.ndarray, progress: bool = False
) -> dict[str, float]:
    """Mean cosine between each method's estimate and the true F_s row, over the hypernetwork test split.

    OFA estimates a test token from the other source tokens only (the test tokens are removed from the candidates,
    with correct ids: the reference shifted neighbour ids, §7.6.5). HyperOFA uses the hypernetwork's test-split
    predictions when the hypernet stage wrote them; random uses the same seeded rows as the assembly.
    """
    test = mapping.split_test
    if len(test) == 0:
        return {}
    truth = np.asarray(mapping.source_coordinates[test], dtype=np.float32)
    out: dict[str, float] = {}
    ofa_rows = ofa_for_tokens(
        mapping.source_postings,
        mapping.source_postings,
        mapping.word_vectors,
        mapping.source_coordinates,
        test,
        exclude_sources=test,
        progress=progress,
        **_ofa_settings(config),
    )
    out["ofa"] = asm.mean_cosine(ofa_rows, truth)
    out["random"] = asm.mean_cosine(random_rows(test, mean, std, init_seed(config)), truth)
    found = load_test_predictions(config.run_dir)
    if found is not None:
        ids, rows = found
        asm.check_predictions(ids, rows, mapping.source_vocab, mapping.k, "hypernet test predictions")
        where = {int(t): i for i, t in enumerate(ids)}
        missing = [int(t) for t in test if int(t) not in where]
        if missing:
            raise HyperofaError(f"hypernet test predictions: source test token {missing[0]} has no prediction")
        out["hyperofa"] = asm.mean_cosine(rows[[where[int(t)] for t in test]], truth)
    return out


def _count_groups(mapping: Mapping, provenance: np.ndarray) -> dict[str, Any]:
    words = mapping.words()
    if len(words) != len(mapping.word_vectors):
        raise HyperofaError(f"{mapping.words_path}: {len(words)} words but word_vectors.npy has {len(mapping.word_vectors)} rows")
    indptr, indices = mapping.target_postings
    lang_codes, lang_names = asm.group_codes(asm.word_language(w) for w in words)
    script_codes, script_names = asm.group_codes(asm.word_script(w) for w in words)
    return {
        "overall": asm.provenance_counts(provenance),
        "by_language": asm.provenance_by_group(provenance, indptr, indices, lang_codes, lang_names),
        "by_script": asm.provenance_by_group(provenance, indptr, indices, script_codes, script_names),
    }


def run_init_stage(config: Config, tracker: Any) -> int:
    method = config.init.method
    run_dir = config.run_dir
    stage = Stage(run_dir, f"{STAGE}/{method}")
    progress = sys.stderr.isatty()
    with tracker.stage(f"{STAGE}-{method}", config) as t:
        t0 = time.perf_counter()
        target_dir = target_tokenizer_dir(config)
        mapping_manifest = Stage(run_dir, "mapping").require()
        inputs: dict[str, Any] = {
            "init": config.section("init")["init"],
            "seed": init_seed(config),
            "source": config.section("source")["source"],
            "target_tokenizer": tokenizer_fingerprint(target_dir),
            "mapping": digest(mapping_manifest),
        }
        if method == "hyperofa":
            inputs["hypernet"] = digest(Stage(run_dir, "hypernet").require())
        if stage.is_complete(digest(inputs)):
            print(f"hyperofa init: up to date ({stage.manifest_path})", file=sys.stderr)
            return 0

        # --- validate every input before writing anything --------------------------------------------------
        mapping = load_mapping(run_dir)
        source_model, source_tok = _load_source(config)
        target_tok = load_tokenizer(target_dir)
        check_source_identity(mapping, source_identity(config))
        special_t, special_s, roles = special_token_pairs(source_tok, target_tok, f"target tokenizer {target_dir}")
        check_mapping_matches(
            mapping, len(source_tok), source_model.config.hidden_size, len(target_tok), inputs["target_tokenizer"]
        )
        copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, special_t, special_s)
        predicted_ids: Optional[np.ndarray] = None
        predicted_rows: Optional[np.ndarray] = None
        if method == "hyperofa":
            predicted_ids, predicted_rows = load_predictions(run_dir)
            asm.check_predictions(predicted_ids, predicted_rows, len(target_tok), mapping.k, "hypernet predictions")
        load_s = time.perf_counter() - t0

        # --- assemble ---------------------------------------------------------------------------------------
        t1 = time.perf_counter()
        mean, std = column_stats(mapping.source_coordinates)
        if method == "ofa":
            predicted_ids = covered_new_tokens(mapping, copy_t)
            predicted_rows = ofa_for_tokens(
                mapping.target_postings,
                mapping.source_postings,
                mapping.word_vectors,
                mapping.source_coordinates,
                predicted_ids,
                progress=progress,
                **_ofa_settings(config),
            )
        assembly = asm.assemble_coordinates(
            len(target_tok),
            mapping.source_coordinates,
            copy_t,
            copy_s,
            predicted_ids,
            predicted_rows,
            method if method != "random" else None,
            mean,
            std,
            init_seed(config),
        )
        embeddings = asm.full_embeddings(assembly.coordinates, mapping.primitives)
        assemble_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        model, info = build_expanded_model(
            source_model, source_tok, target_tok, embeddings, copy_t, copy_s, config.init.pad_to_multiple_of
        )
        del embeddings
        counts = _count_groups(mapping, assembly.provenance)
        quality = heldout_quality(mapping, config, mean, std, progress)

        stage.begin(digest(inputs))
        _save_npy(stage.path / "F_t.npy", assembly.coordinates)
        _save_npy(stage.path / "P.npy", mapping.primitives)
        _save_npy(stage.path / "provenance.npy", assembly.provenance)
        atomic_write_json(stage.path / "provenance_counts.json", counts)
        atomic_write_json(stage.path / "quality.json", {"heldout_cosine": quality, "test_tokens": len(mapping.split_test)})
        save_expanded_model(model, target_tok, stage.path / "model")
        outputs = ["F_t.npy", "P.npy", "provenance.npy", "provenance_counts.json", "quality.json"] + sorted(
            f"model/{p.name}" for p in (stage.path / "model").iterdir() if p.is_file()
        )
        overall = counts["overall"]
        manifest_counts = {
            "V_t": len(target_tok),
            "V_s": mapping.source_vocab,
            "k": mapping.k,
            "D": mapping.hidden_size,
            "model_vocab_size": info.model_vocab_size,
            "predictions_overridden_by_copy": assembly.predictions_overridden,
            **{f"provenance_{kind}": n for kind, n in overall.items()},
        }
        stage.write_manifest(
            config=config.effective(),
            inputs=inputs,
            outputs=outputs,
            counts=manifest_counts,
            extra={
                "method": method,
                "family": info.family,
                "factorized": not asm.is_identity(mapping.primitives),
                "padded_rows": info.padded_rows,
                "position_shift": info.position_shift,
                "special_tokens": roles,
                "heldout_cosine": quality,
            },
        )
        export_s = time.perf_counter() - t2

        metrics: dict[str, float] = {f"provenance/{kind}": n for kind, n in overall.items()}
        metrics["provenance/total"] = int(sum(overall.values()))
        for script, by_kind in counts["by_script"].items():
            for kind, n in by_kind.items():
                metrics[f"provenance_script/{script}/{kind}"] = n
        metrics.update({f"heldout_cosine/{m}": v for m, v in quality.items()})
        if method in quality:
            metrics["heldout_cosine"] = quality[method]
        metrics.update({"seconds/load": load_s, "seconds/assemble": assemble_s, "seconds/export": export_s})
        t.log_metrics(metrics)
        t.set_tags({"init.method": method, "init.family": info.family})
        t.log_artifact(stage.path / "provenance_counts.json")
        t.log_artifact(stage.path / "quality.json")
    print(
        f"hyperofa init: {method}: {overall} -> {stage.path / 'model'}"
        + (f"; held-out cosine {quality}" if quality else ""),
        file=sys.stderr,
    )
    return 0
