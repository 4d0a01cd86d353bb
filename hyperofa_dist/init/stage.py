"""`hyperofa init`: mapping (+ hypernetwork predictions) -> `<run_dir>/init/<method>/`.

Outputs: `F_t.npy` (target coordinates), `P.npy` (the source primitives, reused), `provenance.npy` (uint8 per target
token: 0 copy, 1 hyperofa, 2 ofa, 3 random, 4 mean), `provenance_counts.json` (overall, per language and per script
of the tokens' words), `quality.json` (held-out cosine per method, step-0 new-token loss), `model/` (stock HF masked
or causal LM + target tokenizer) and the manifest. Every input is validated before the stage directory is touched,
so bad input leaves nothing behind.

The source's kind (`formats.models.model_kind`) decides the export and the new-token loss: a masked LM gets the
tied MLM export and the masked-LM loss at masked new-token positions; a causal LM gets its input embeddings (and an
untied output projection, from the columns D.. of P) with copied rows exact, and the next-token loss at positions
whose label is a new token (`models/nexttoken.py`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..errors import HyperofaError
from ..formats import init as out_format
from ..formats.hypernet import load_test_predictions
from ..formats.hypernet import stage_of as hypernet_stage
from ..formats.mapping import Mapping, load_mapping
from ..formats.mapping import stage_of as mapping_stage
from ..formats.models import (
    CAUSAL,
    Source,
    check_tokenizer_beside,
    load_source,
    model_files,
    model_identity,
    save_model_dir,
    source_identity,
)
from ..formats.modelcard import ModelCard, corpus_facts, write_model_card
from ..formats.tokenizer import ignored_settings, load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
from ..method import assemble as asm
from ..method.heldout import OBJECTIVES, heldout_shardset, init_seed, new_token_loss
from ..method.ofa import ofa_for_tokens, ofa_settings
from ..method.random import column_stats, random_rows
from ..models.export import ExportInfo, build_expanded_any, merge_copy_pairs, special_token_pairs
from ..models.head import HeadReport, complete_head
from ..runtime.stage import StageShell
from ..tracking import METHOD_TAG, STAGE_TAG, STEP_TAG, registered_model_name
from .methods import METHODS, MethodContext
from .rows import describe as describe_rows
from .rows import row_metrics, row_statistics


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
        **ofa_settings(config),
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


def _inputs(config: Config, target_dir: Any) -> dict[str, Any]:
    run_dir = config.run_dir
    inputs: dict[str, Any] = {
        "config": config.fingerprint("init", "source"),
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
    if METHODS[config.init.method].reads_hypernet:
        inputs["hypernet"] = hypernet_stage(run_dir).require().get("outputs")
    if config.init.heldout_blocks:  # the new-token loss reads prepare's held-out shards when there are any
        shardset = heldout_shardset(config, inputs["target_tokenizer"])
        inputs["heldout"] = {"shards": shardset.inputs_digest if shardset else None,
                             "mlm": config.evaluate.mlm_probability}
    return inputs


@dataclass
class Loaded:
    """Every input, read and checked against the others before anything is computed or written."""

    mapping: Mapping
    source: Source
    head: HeadReport
    target_tok: Any
    roles: dict[str, Any]  # special tokens paired by role
    copy_t: np.ndarray
    copy_s: np.ndarray
    stats: tuple[np.ndarray, np.ndarray]  # column mean and std of F_s: the random rows' distribution


def _head(config: Config, source: Source) -> HeadReport:
    if source.kind != CAUSAL:
        return complete_head(source.model, source.missing, seed=config.run.seed, donor=config.source.mlm_head)
    if source.missing:
        raise HyperofaError(
            f"source.model={config.source.model}: the causal LM's checkpoint lacks {len(source.missing)} "
            f"weights ({', '.join(source.missing[:3])}); only a complete model can be expanded"
        )
    return HeadReport("checkpoint", [])


def _load(config: Config, inputs: dict[str, Any], target_dir: Any) -> Loaded:
    mapping = load_mapping(config.run_dir)
    source = load_source(config)
    head = _head(config, source)
    target_tok = load_tokenizer(target_dir)
    special_t, special_s, roles = special_token_pairs(
        source.tokenizer, target_tok, f"target tokenizer {target_dir}", source.kind
    )
    hidden = source.model.get_input_embeddings().embedding_dim
    mapping.require_source(inputs["source"], len(source.tokenizer), hidden, 2 if source.untied else 1)
    mapping.require_target(len(target_tok), inputs["target_tokenizer"])
    copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, special_t, special_s)
    return Loaded(mapping, source, head, target_tok, roles, copy_t, copy_s, column_stats(mapping.source_coordinates))


def _say_head(shell: StageShell, config: Config, head: HeadReport) -> None:
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


@dataclass
class Built:
    """The expanded model and everything measured on it, before anything is written."""

    assembly: asm.Assembly
    shift: Optional[np.ndarray]
    model: Any
    info: ExportInfo
    counts: dict[str, Any]
    rows: dict[str, Any]
    quality: dict[str, float]
    new_tokens: dict[str, Any]


def _assemble(config: Config, loaded: Loaded, target_dir: Any, shell: StageShell) -> tuple[asm.Assembly, Any]:
    """The method's rows, then F_t (copied, predicted, random rows) and the shift `init.recentre` applied."""
    m, method = loaded.mapping, config.init.method
    predicted = METHODS[method].predict(MethodContext(
        config, m, loaded.source.tokenizer, loaded.target_tok, target_dir, loaded.copy_t, sys.stderr.isatty(),
    ))
    if predicted.note:
        shell.say(predicted.note)
    _say_head(shell, config, loaded.head)
    return asm.method_coordinates(
        len(loaded.target_tok), m.source_coordinates, loaded.copy_t, loaded.copy_s, predicted.ids, predicted.rows,
        method, *loaded.stats, init_seed(config), config.init.recentre,
    )


def _build(config: Config, loaded: Loaded, assembly: asm.Assembly, shift: Any, inputs: dict[str, Any],
           target_dir: Any) -> Built:
    m, source, target_tok = loaded.mapping, loaded.source, loaded.target_tok
    embeddings = asm.full_embeddings(assembly.coordinates, m.primitives)
    model, info = build_expanded_any(
        source.model, source.tokenizer, target_tok, embeddings, loaded.copy_t, loaded.copy_s,
        config.init.pad_to_multiple_of, causal=source.kind == CAUSAL, untied=source.untied,
    )
    del embeddings
    check_tokenizer_beside(model.config, target_tok, probe_texts(target_tok, len(source.tokenizer)),
                           f"target tokenizer {target_dir}")
    return Built(
        assembly, shift, model, info, _count_groups(m, assembly.provenance),
        row_statistics(assembly.coordinates, m.primitives, assembly.provenance),
        heldout_quality(m, config, *loaded.stats, sys.stderr.isatty()),
        new_token_loss(config, model, target_tok, inputs["target_tokenizer"], assembly.provenance, source.kind),
    )


def _write(shell: StageShell, config: Config, loaded: Loaded, built: Built, target_dir: Any) -> Any:
    """The arrays, the model with its card, and the manifest, last; returns the model directory."""
    method, m, source, info = config.init.method, loaded.mapping, loaded.source, built.info
    objective = OBJECTIVES[source.kind]
    outputs = out_format.write_arrays(
        shell.path, built.assembly.coordinates, m.primitives, built.assembly.provenance, built.counts,
        {"heldout_cosine": built.quality, "test_tokens": len(m.split["test"]), objective.name: built.new_tokens,
         "rows": built.rows},
    )
    model_dir = save_model_dir(built.model, loaded.target_tok, shell.path / out_format.MODEL)
    languages, data = corpus_facts(config)
    write_model_card(model_dir, ModelCard(
        base_model=config.source.model, method=method, stage="init", kind=source.kind, languages=languages,
        data=data, source_vocab=len(source.tokenizer), target_vocab=len(loaded.target_tok),
        model_vocab=info.model_vocab_size, steps=0,
        target_tokenizer=config.tokenizer.path or "built by `hyperofa tokenizer`",
        metrics={f"new-token {objective.label} loss, step 0": built.new_tokens.get("loss", {})},
    ))
    shell.finish(
        outputs=outputs + model_files(model_dir),
        counts={
            "V_t": len(loaded.target_tok), "V_s": m.source_vocab, "k": m.k, "D": m.hidden_size,
            "model_vocab_size": info.model_vocab_size,
            "predictions_overridden_by_copy": built.assembly.predictions_overridden,
            **{f"provenance_{kind}": n for kind, n in built.counts["overall"].items()},
        },
        extra={
            "method": method, "kind": source.kind, "tied": not source.untied, "mlm_head": loaded.head.as_dict(),
            "family": info.family, "factorized": not asm.is_identity(m.primitives),
            "padded_rows": info.padded_rows, "position_shift": info.position_shift, "special_tokens": loaded.roles,
            "heldout_cosine": built.quality, f"{objective.name}_loss": built.new_tokens.get("loss", {}),
            "rows": built.rows,
            **({"recentre_shift_norm": float(np.linalg.norm(built.shift))} if built.shift is not None else {}),
            **ignored_settings({"source": config.source.tokenizer or config.source.model, "target": target_dir},
                               shell.say),
        },
    )
    return model_dir


def init_metrics(built: Built, method: str, loss_name: str) -> dict[str, float]:
    """What the stage's MLflow run records: provenance counts (overall and per script), held-out cosines,
    the new-token loss per language, the rows' statistics."""
    overall = built.counts["overall"]
    metrics: dict[str, float] = {f"provenance/{kind}": n for kind, n in overall.items()}
    metrics["provenance/total"] = int(sum(overall.values()))
    for script, by_kind in built.counts["by_script"].items():
        for provenance_kind, n in by_kind.items():
            metrics[f"provenance_script/{script}/{provenance_kind}"] = n
    metrics.update({f"heldout_cosine/{m}": v for m, v in built.quality.items()})
    if method in built.quality:
        metrics["heldout_cosine"] = built.quality[method]
    for lang, value in built.new_tokens.get("loss", {}).items():
        metrics[f"{loss_name}_loss" if lang == "average" else f"{loss_name}_loss/{lang}"] = value
    metrics.update(row_metrics(built.rows))
    return metrics


def run(config: Config, tracker: Any) -> int:
    method = config.init.method
    stage = out_format.stage_of(config.run_dir, method)
    t0 = time.perf_counter()
    target_dir = target_tokenizer_dir(config)
    inputs = _inputs(config, target_dir)
    with StageShell.open(config, tracker, "init", stage, inputs, run_name=f"init/{method}",
                         tags={METHOD_TAG: method}) as shell:
        if shell.up_to_date:
            return 0
        loaded = _load(config, inputs, target_dir)
        t1 = time.perf_counter()
        assembly, shift = _assemble(config, loaded, target_dir, shell)
        t2 = time.perf_counter()
        built = _build(config, loaded, assembly, shift, inputs, target_dir)
        shell.begin()
        model_dir = _write(shell, config, loaded, built, target_dir)
        objective, kind = OBJECTIVES[loaded.source.kind], loaded.source.kind
        t = shell.run
        t.log_metrics({**init_metrics(built, method, objective.name), "seconds/load": t1 - t0,
                       "seconds/assemble": t2 - t1, "seconds/export": time.perf_counter() - t2})
        t.set_tags({"init.family": built.info.family, "init.kind": kind, "init.mlm_head": loaded.head.origin})
        t.log_model(model_dir, registered_model_name(config.tracking.experiment, method),
                    {STAGE_TAG: "init", METHOD_TAG: method, STEP_TAG: 0})
        t.log_artifact(stage.path / out_format.PROVENANCE_COUNTS)
        t.log_artifact(stage.path / out_format.QUALITY)
    new_loss, quality = built.new_tokens.get("loss", {}).get("average"), built.quality
    shell.say(
        f"{method}: {built.counts['overall']} -> {model_dir}" + (f"; held-out cosine {quality}" if quality else "")
        + (f"; new-token {objective.label} loss {new_loss:.4f}" if new_loss is not None else "")
        + (f"; {describe_rows(built.rows)}" if describe_rows(built.rows) else "")
    )
    return 0
