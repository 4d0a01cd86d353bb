"""`hyperofa init`: mapping (+ hypernetwork predictions) -> `<run_dir>/init/<method>/`.

Outputs: `F_t.npy` (target coordinates), `P.npy` (the source primitives, reused), `provenance.npy` (uint8 per target
token: 0 copy, 1 hyperofa, 2 ofa, 3 random, 4 mean), `provenance_counts.json` (overall, per language and per script
of the tokens' words), `quality.json` (held-out cosine per method, step-0 new-token loss), `model/` (stock HF masked
or causal LM + target tokenizer) and the manifest. Every input is validated before the stage directory is touched,
so bad input leaves nothing behind.

The source's kind (`formats.models.model_kind`) decides the export and the new-token loss: a masked LM gets the
tied MLM export and the masked-LM loss at masked new-token positions; a causal LM gets its input embeddings (and an
untied output projection, from the columns D.. of P) with copied rows exact, and the next-token loss at positions
whose label is a new token (`nexttoken.py`).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..errors import HyperofaError
from ..formats import init as out_format
from ..formats.hypernet import load_predictions, load_test_predictions
from ..formats.hypernet import stage_of as hypernet_stage
from ..formats.mapping import Mapping, load_mapping
from ..formats.mapping import stage_of as mapping_stage
from ..formats.models import (
    CAUSAL,
    check_tokenizer_beside,
    load_source,
    model_files,
    model_identity,
    save_model_dir,
    source_identity,
)
from ..formats.modelcard import ModelCard, corpus_facts, write_model_card
from ..formats.rundir import Stage
from ..formats.shards import STAGE as PREPARE_STAGE
from ..formats.tokenizer import ignored_settings, load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
from ..runtime.device import resolve_device
from ..runtime.stage import StageShell
from ..tracking import METHOD_TAG, STAGE_TAG, STEP_TAG, registered_model_name
from . import assemble as asm
from .export import build_expanded_any, merge_copy_pairs, special_token_pairs
from .head import HeadReport, complete_head
from .mean import piece_means
from .ofa import ofa_for_tokens
from .random import column_stats, random_rows
from .rows import describe as describe_rows
from .rows import row_metrics, row_statistics

def init_seed(config: Config) -> int:
    return config.init.seed if config.init.seed is not None else config.run.seed


def _ofa_settings(config: Config) -> dict[str, Any]:
    c = config.init
    return dict(top_k=c.top_k, temperature=c.temperature, chunk_size=c.chunk_size, weighting=c.ofa_weighting,
                device=resolve_device(c.device, "init.device").type)


def covered_new_tokens(mapping: Mapping, copied: np.ndarray) -> np.ndarray:
    """Target tokens with words that are not copied: the set HyperOFA predicts and OFA initialises (docs/METHOD.md §1.8)."""
    return np.setdiff1d(mapping.target_postings.covered(), copied)


def heldout_quality(
    mapping: Mapping, config: Config, mean: np.ndarray, std: np.ndarray, progress: bool = False
) -> dict[str, float]:
    """Mean cosine between each method's estimate and the true F_s row, over the hypernetwork test split.

    OFA estimates a test token from the other source tokens only (the test tokens are removed from the candidates,
    with correct ids: the reference shifted neighbour ids, docs/METHOD.md §7). HyperOFA uses the hypernetwork's test-split
    predictions when the hypernet stage wrote them; random uses the same seeded rows as the assembly.
    """
    test = mapping.split["test"]
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


def new_token_loss(
    config: Config, model: Any, tokenizer: Any, target_fingerprint: dict[str, str], provenance: np.ndarray,
    kind: str = "masked",
) -> dict[str, Any]:
    """Step-0 loss on held-out text at the positions where the init methods differ: for a masked LM the MLM loss at
    masked positions whose label is a new (not copied) token, masked with the same HELDOUT stream as evaluate and
    the pretraining job; for a causal LM the next-token loss at positions whose next token is new. Uses the prepare
    stage's held-out shards when they were made with the target tokenizer; {} otherwise."""
    from ..evaluate.mlm import mlm_loss_per_language
    from ..formats.shards import first_blocks, heldout_shards, prepare_dir
    from ..formats.tokenizer import TOKENIZER_JSON
    from .nexttoken import next_token_loss_per_language

    c = config.init
    shards_dir = prepare_dir(config.run_dir)
    manifest = Stage(shards_dir.parent, shards_dir.name).manifest() if c.heldout_blocks else None
    made_with = ((manifest or {}).get("inputs") or {}).get("tokenizer", {}).get(TOKENIZER_JSON)
    if manifest is None or made_with != target_fingerprint.get(TOKENIZER_JSON):
        return {}
    blocks = first_blocks(heldout_shards(shards_dir), c.heldout_blocks)
    if not blocks:
        return {}
    scored = np.zeros(model.get_input_embeddings().num_embeddings, dtype=bool)
    scored[: len(provenance)] = provenance != asm.COPY
    device = resolve_device(c.device, "init.device")
    if kind == CAUSAL:
        per_language, _ = next_token_loss_per_language(
            model.to(device), blocks, scored, batch_size=c.heldout_batch_size, device=device
        )
    else:
        per_language, _ = mlm_loss_per_language(
            model.to(device), tokenizer, blocks, seed=config.run.seed, probability=config.evaluate.mlm_probability,
            batch_size=c.heldout_batch_size, device=device, scored_labels=scored,
        )
    model.to("cpu")
    losses = {lang: round(v["loss"], 6) for lang, v in per_language.items()}
    if losses:
        losses["average"] = round(float(np.mean(list(losses.values()))), 6)
    return {"loss": losses, "positions": {lang: v["positions"] for lang, v in per_language.items()}}


def probe_texts(tokenizer: Any, first_new: int, n: int = 200, width: int = 6) -> list[str]:
    """Texts that exercise a target tokenizer's appended pieces: runs of `width` consecutive new ids, decoded,
    spread over them (and, without new ids, over the whole vocabulary)."""
    start = first_new if first_new < len(tokenizer) else 0
    ids = np.arange(start, len(tokenizer))
    starts = np.unique(np.linspace(0, max(len(ids) - width, 0), num=min(n, len(ids))).astype(np.int64))
    return [tokenizer.decode([int(i) for i in ids[a : a + width]], skip_special_tokens=True) for a in starts]


def _count_groups(mapping: Mapping, provenance: np.ndarray) -> dict[str, Any]:
    words = mapping.words()
    indptr, indices = mapping.target_postings.indptr, mapping.target_postings.indices
    lang_codes, lang_names = asm.group_codes(asm.word_language(w) for w in words)
    script_codes, script_names = asm.group_codes(asm.word_script(w) for w in words)
    return {
        "overall": asm.provenance_counts(provenance),
        "by_language": asm.provenance_by_group(provenance, indptr, indices, lang_codes, lang_names),
        "by_script": asm.provenance_by_group(provenance, indptr, indices, script_codes, script_names),
    }


def run(config: Config, tracker: Any) -> int:
    method = config.init.method
    run_dir = config.run_dir
    stage = out_format.stage_of(run_dir, method)
    progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    target_dir = target_tokenizer_dir(config)
    inputs: dict[str, Any] = {
        **config.fingerprint("init", "source"),
        "source": source_identity(config),  # by content: the same model at another path is the same input
        "seed": init_seed(config),
        "target_tokenizer": tokenizer_fingerprint(target_dir),
        "mapping": mapping_stage(run_dir).require().get("outputs"),
        # A source without an MLM head gets one from run.seed (or source.mlm_head), whatever init.seed says.
        "mlm_head": {
            "seed": config.run.seed,
            **(model_identity(config.source.mlm_head) if config.source.mlm_head else {}),
        },
    }
    if method == "hyperofa":
        inputs["hypernet"] = hypernet_stage(run_dir).require().get("outputs")
    if config.init.heldout_blocks:  # the new-token loss reads prepare's held-out shards when there are any
        prepared = Stage(run_dir, PREPARE_STAGE).manifest()
        inputs["heldout"] = {"shards": (prepared or {}).get("inputs_digest"), "mlm": config.evaluate.mlm_probability}
    with StageShell.open(config, tracker, "init", stage, inputs, run_name=f"init/{method}",
                         tags={METHOD_TAG: method}) as shell:
        if shell.up_to_date:
            return 0
        t = shell.run

        # --- validate every input before writing anything --------------------------------------------------
        mapping = load_mapping(run_dir)
        source = load_source(config)
        source_model, source_tok, kind = source.model, source.tokenizer, source.kind
        if kind == CAUSAL:
            if source.missing:
                raise HyperofaError(
                    f"source.model={config.source.model}: the causal LM's checkpoint lacks {len(source.missing)} "
                    f"weights ({', '.join(source.missing[:3])}); only a complete model can be expanded"
                )
            head = HeadReport("checkpoint", [])
        else:
            head = complete_head(source_model, source.missing, seed=config.run.seed, donor=config.source.mlm_head)
        target_tok = load_tokenizer(target_dir)
        special_t, special_s, roles = special_token_pairs(
            source_tok, target_tok, f"target tokenizer {target_dir}", kind
        )
        hidden = source_model.get_input_embeddings().embedding_dim
        mapping.require_source(inputs["source"], len(source_tok), hidden, 2 if source.untied else 1)
        mapping.require_target(len(target_tok), inputs["target_tokenizer"])
        copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, special_t, special_s)
        predicted_ids: Optional[np.ndarray] = None
        predicted_rows: Optional[np.ndarray] = None
        if method == "hyperofa":
            predicted_ids, predicted_rows = load_predictions(run_dir)
            asm.check_predictions(predicted_ids, predicted_rows, len(target_tok), mapping.k, "hypernet predictions")
        elif method == "mean":
            uncopied = np.setdiff1d(np.arange(len(target_tok), dtype=np.int64), copy_t)
            means = piece_means(source_tok, target_tok, uncopied, mapping.source_coordinates,
                                f"target tokenizer {target_dir}")
            predicted_ids, predicted_rows = means.token_ids, means.rows
        load_s = time.perf_counter() - t0
        if method == "mean" and means.without:
            shell.say(f"{means.without} new tokens split into the source's unknown token: they stay random")
        if head.origin != "checkpoint":
            made = (
                f"copied from source.mlm_head={head.donor}" if head.origin == "copied" else
                f"made from run.seed={head.seed}, the same for every init method (set source.mlm_head to copy a "
                "trained one)"
            )
            shell.say(f"warning: the source model {config.source.model} has no MLM head (missing "
                      f"{', '.join(head.missing)}); the head is {made}")
        elif config.source.mlm_head:
            shell.say(f"warning: source.mlm_head is set but the source model {config.source.model} has its own MLM "
                      "head; it is kept")

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
        if method == "hyperofa" and config.init.ofa_blend > 0:
            ofa_rows = ofa_for_tokens(mapping.target_postings, mapping.source_postings, mapping.word_vectors,
                                      mapping.source_coordinates, predicted_ids, progress=progress,
                                      **_ofa_settings(config))
            predicted_rows = asm.blend(predicted_ids, predicted_rows, predicted_ids, ofa_rows, config.init.ofa_blend)
        assembly, shift = asm.method_coordinates(
            len(target_tok), mapping.source_coordinates, copy_t, copy_s, predicted_ids, predicted_rows, method, mean,
            std, init_seed(config), config.init.recentre,
        )
        embeddings = asm.full_embeddings(assembly.coordinates, mapping.primitives)
        assemble_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        model, info = build_expanded_any(
            source_model, source_tok, target_tok, embeddings, copy_t, copy_s, config.init.pad_to_multiple_of,
            causal=kind == CAUSAL, untied=source.untied,
        )
        del embeddings
        check_tokenizer_beside(model.config, target_tok, probe_texts(target_tok, len(source_tok)),
                               f"target tokenizer {target_dir}")
        counts = _count_groups(mapping, assembly.provenance)
        rows = row_statistics(assembly.coordinates, mapping.primitives, assembly.provenance)
        quality = heldout_quality(mapping, config, mean, std, progress)
        new_tokens = new_token_loss(config, model, target_tok, inputs["target_tokenizer"], assembly.provenance, kind)
        loss_name = "new_token_causal" if kind == CAUSAL else "new_token_mlm"

        shell.begin()
        outputs = out_format.write_arrays(
            stage.path, assembly.coordinates, mapping.primitives, assembly.provenance, counts,
            {"heldout_cosine": quality, "test_tokens": len(mapping.split["test"]), loss_name: new_tokens,
             "rows": rows},
        )
        model_dir = save_model_dir(model, target_tok, stage.path / out_format.MODEL)
        languages, data = corpus_facts(config)
        write_model_card(model_dir, ModelCard(
            base_model=config.source.model, method=method, stage="init", kind=kind, languages=languages, data=data,
            source_vocab=len(source_tok), target_vocab=len(target_tok), model_vocab=info.model_vocab_size, steps=0,
            target_tokenizer=config.tokenizer.path or "built by `hyperofa tokenizer`",
            metrics={f"new-token {'next-token' if kind == CAUSAL else 'MLM'} loss, step 0": new_tokens.get("loss", {})},
        ))
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
        shell.finish(
            outputs=outputs + model_files(model_dir),
            counts=manifest_counts,
            extra={
                "method": method,
                "kind": kind,
                "tied": not source.untied,
                "mlm_head": head.as_dict(),
                "family": info.family,
                "factorized": not asm.is_identity(mapping.primitives),
                "padded_rows": info.padded_rows,
                "position_shift": info.position_shift,
                "special_tokens": roles,
                "heldout_cosine": quality,
                f"{loss_name}_loss": new_tokens.get("loss", {}),
                "rows": rows,
                **({"recentre_shift_norm": float(np.linalg.norm(shift))} if shift is not None else {}),
                **ignored_settings({"source": config.source.tokenizer or config.source.model, "target": target_dir},
                                   shell.say),
            },
        )
        export_s = time.perf_counter() - t2

        metrics: dict[str, float] = {f"provenance/{kind}": n for kind, n in overall.items()}
        metrics["provenance/total"] = int(sum(overall.values()))
        for script, by_kind in counts["by_script"].items():
            for provenance_kind, n in by_kind.items():
                metrics[f"provenance_script/{script}/{provenance_kind}"] = n
        metrics.update({f"heldout_cosine/{m}": v for m, v in quality.items()})
        if method in quality:
            metrics["heldout_cosine"] = quality[method]
        for lang, value in new_tokens.get("loss", {}).items():
            metrics[f"{loss_name}_loss" if lang == "average" else f"{loss_name}_loss/{lang}"] = value
        metrics.update(row_metrics(rows))
        metrics.update({"seconds/load": load_s, "seconds/assemble": assemble_s, "seconds/export": export_s})
        t.log_metrics(metrics)
        t.set_tags({"init.family": info.family, "init.kind": kind, "init.mlm_head": head.origin})
        t.log_model(model_dir, registered_model_name(config.tracking.experiment, method),
                    {STAGE_TAG: "init", METHOD_TAG: method, STEP_TAG: 0})
        t.log_artifact(stage.path / out_format.PROVENANCE_COUNTS)
        t.log_artifact(stage.path / out_format.QUALITY)
    new_loss = new_tokens.get("loss", {}).get("average")
    objective = "next-token" if kind == CAUSAL else "MLM"
    shell.say(
        f"{method}: {overall} -> {model_dir}" + (f"; held-out cosine {quality}" if quality else "")
        + (f"; new-token {objective} loss {new_loss:.4f}" if new_loss is not None else "")
        + (f"; {describe_rows(rows)}" if describe_rows(rows) else "")
    )
    return 0
