"""`hyperofa evaluate`: run the selected tasks on one model, write `{task: {lang: {metric}, "average": {...}}}`.

The model is an HF directory or a run stage (`init/hyperofa` -> `<run.dir>/init/hyperofa/model`). Benchmark data
sits in task sub-directories of `evaluate.data_dir`; the mlm task reads the held-out shards of `prepare`. The
stage directory `<run.dir>/evaluate/<name>/` holds results.json and the manifest (inputs: the evaluate config,
the model's and the data's fingerprints), so re-running the same evaluation is a no-op. Metrics go to MLflow as
`<task>.<lang>.<metric>` and `<task>.average.<metric>` at step `evaluate.step`, tagged with `init.method` so
`hyperofa compare` can group runs.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..artifacts import Stage, atomic_write_json, digest, sha256_file
from ..config import Config
from ..errors import HyperofaError
from . import mlm, retrieval, tagging
from .model import (
    check_model_vocabulary,
    check_vocabulary,
    hidden_state_index,
    infer_init_method,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_dir,
)

TASK_DIRS = {"srt": ("srt", "tatoeba"), "srb": ("srb", "bible"), "pos": ("pos", "udpos"), "ner": ("ner", "panx")}
MAIN_METRIC = {"srt": "top10", "srb": "top10", "pos": "f1", "ner": "f1", "mlm": "loss"}
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def task_data_dir(data_dir: Optional[str], task: str) -> Path:
    if not data_dir:
        raise HyperofaError(f"evaluate.data_dir is unset but task {task} needs benchmark files (--data DIR)")
    root = Path(data_dir)
    if not root.is_dir():
        raise HyperofaError(f"{root}: evaluate.data_dir not found")
    for name in TASK_DIRS[task]:
        if (root / name).is_dir():
            return root / name
    names = " or ".join(f"{n}/" for n in TASK_DIRS[task])
    raise HyperofaError(f"{root}: no {names} directory for task {task}")


def with_average(per_language: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-language metrics plus their unweighted mean over languages (the method's average)."""
    metrics = sorted({m for values in per_language.values() for m in values})
    average = {m: float(np.mean([v[m] for v in per_language.values() if m in v])) for m in metrics}
    return {**dict(sorted(per_language.items())), "average": average}


def flatten_results(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """{task: {lang: {metric: v}}} -> {'task.lang.metric': v}: the MLflow metric names."""
    return {
        f"{task}.{lang}.{metric}": value
        for task, languages in results.items()
        for lang, metrics in languages.items()
        for metric, value in metrics.items()
    }


def default_name(model_dir: Path, run_dir: Path) -> str:
    """`init/hyperofa/model` under the run dir -> `init-hyperofa`; an outside directory -> its own name."""
    try:
        parts = list(model_dir.relative_to(run_dir).parts)
    except ValueError:
        parts = [model_dir.parent.name, model_dir.name] if model_dir.name == "model" else [model_dir.name]
    if len(parts) > 1 and parts[-1] == "model":
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "model"


def _files_fingerprint(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _heldout_dir(config: Config) -> Path:
    return Path(config.evaluate.heldout_dir) if config.evaluate.heldout_dir else config.run_dir / "prepare"


def _inputs(config: Config, model_dir: Path) -> dict[str, Any]:
    ev = config.evaluate.model_dump(mode="json")
    ev.pop("output")
    inputs: dict[str, Any] = {
        "evaluate": ev,
        "seed": config.run.seed,
        "model": {n: sha256_file(model_dir / n) for n in MODEL_FILES if (model_dir / n).is_file()},
        "tokenizer": {p.name: sha256_file(p) for p in sorted(model_dir.glob("*token*")) if p.is_file()},
        "data": {},
    }
    for task in config.evaluate.tasks:
        if task == "mlm":
            inputs["data"][task] = {p.name: sha256_file(p) for p in mlm.find_heldout_shards(_heldout_dir(config))}
        else:
            inputs["data"][task] = _files_fingerprint(task_data_dir(config.evaluate.data_dir, task))
    return inputs


def evaluate_model(
    config: Config, model_dir: Path
) -> tuple[dict[str, Any], dict[str, dict[str, str]], dict[str, float]]:
    """(results, skipped languages per task, extra metrics such as tagging selection and timings)."""
    ev = config.evaluate
    device = pick_device(ev.device)
    tokenizer = load_tokenizer(model_dir)
    results: dict[str, Any] = {}
    skipped: dict[str, dict[str, str]] = {}
    extra: dict[str, float] = {}
    encoder = None
    for task in ev.tasks:
        started = time.perf_counter()
        if task in ("srt", "srb"):
            if encoder is None:
                encoder = load_model(model_dir, "AutoModel", add_pooling_layer=False).to(device)
                check_model_vocabulary(tokenizer, encoder, model_dir)
            layer = hidden_state_index(ev.layer, encoder.config.num_hidden_layers, model_dir)
            per_language, skipped[task] = retrieval.evaluate_retrieval(
                encoder,
                tokenizer,
                task_data_dir(ev.data_dir, task),
                layer_index=layer,
                center=ev.center,
                languages=ev.languages,
                batch_size=ev.batch_size,
                max_length=ev.max_length,
                max_sentences=ev.max_sentences,
                device=device,
                task=task,
            )
        elif task in ("pos", "ner"):
            t = ev.tagging
            settings = tagging.TaggingSettings(
                epochs=t.epochs,
                lr=t.lr,
                batch_size=t.batch_size,
                max_length=t.max_length,
                weight_decay=t.weight_decay,
                seed=config.run.seed if t.seed is None else t.seed,
                max_train_sentences=t.max_train_sentences,
                max_test_sentences=ev.max_sentences,
            )
            outcome = tagging.evaluate_tagging(
                model_dir,
                tokenizer,
                task_data_dir(ev.data_dir, task),
                task,
                english=ev.english,
                languages=ev.languages,
                settings=settings,
                device=device,
            )
            per_language, skipped[task] = outcome.per_language, outcome.skipped
            extra[f"{task}.english_dev.f1"] = outcome.dev_f1
            extra[f"{task}.best_epoch"] = float(outcome.best_epoch)
        else:
            model = load_model(model_dir, "AutoModelForMaskedLM").to(device)
            check_model_vocabulary(tokenizer, model, model_dir)
            shards = mlm.find_heldout_shards(_heldout_dir(config))
            blocks = mlm.read_heldout_blocks(shards, ev.mlm_blocks, ev.languages)
            if not blocks:
                raise HyperofaError(f"{_heldout_dir(config)}: no held-out blocks for the requested languages")
            per_language = mlm.mlm_loss_per_language(
                model,
                tokenizer,
                blocks,
                seed=config.run.seed,
                probability=ev.mlm_probability,
                batch_size=ev.mlm_batch_size,
                device=device,
            )
            skipped[task] = {l: "no held-out blocks" for l in (ev.languages or []) if l not in blocks}
            del model
        results[task] = with_average(per_language)
        extra[f"time/{task}_s"] = time.perf_counter() - started
        for lang, reason in sorted(skipped.get(task, {}).items()):
            print(f"hyperofa evaluate: {task}: skipped {lang} ({reason})", file=sys.stderr)
    return results, skipped, extra


def run_evaluate_stage(config: Config, tracker: Any) -> int:
    ev = config.evaluate
    model_dir = resolve_model_dir(ev.model, config.run_dir)
    name = ev.name or default_name(model_dir, config.run_dir)
    stage = Stage(config.run_dir, f"evaluate/{name}")
    method = ev.init_method or infer_init_method(model_dir)
    _check_vocab_cheaply(model_dir)
    inputs = _inputs(config, model_dir)
    key = digest(inputs)
    results_path = stage.path / "results.json"
    output = Path(ev.output).resolve() if ev.output else results_path
    if stage.is_complete(key) and results_path.is_file():
        if output != results_path:
            atomic_write_json(output, _read_json(results_path))
        print(f"hyperofa evaluate: up to date ({stage.manifest_path})", file=sys.stderr)
        return 0
    stage.begin(key)
    with tracker.stage("evaluate", config) as run:
        run.set_tags({"init.method": method or "unknown", "evaluate.name": name, "evaluate.model": str(model_dir)})
        results, skipped, extra = evaluate_model(config, model_dir)
        atomic_write_json(results_path, results)
        if output != results_path:
            atomic_write_json(output, results)
        run.log_metrics({**flatten_results(results), **extra}, step=ev.step)
        flat_skipped = {f"{t}:{l}": r for t, langs in skipped.items() for l, r in langs.items()}
        if flat_skipped:
            run.set_tags({"evaluate.skipped": ", ".join(sorted(flat_skipped))})
        run.log_artifact(results_path)
        stage.write_manifest(
            config=config.effective(),
            inputs=inputs,
            outputs=["results.json"],
            counts={task: len(langs) - 1 for task, langs in results.items()},
            extra={"skipped": skipped, "init_method": method, "step": ev.step},
        )
    summary = ", ".join(
        f"{task} {MAIN_METRIC[task]}={values['average'][MAIN_METRIC[task]]:.2f}" for task, values in results.items()
    )
    print(f"hyperofa evaluate: {name}: {summary} -> {output}", file=sys.stderr)
    return 0


def _check_vocab_cheaply(model_dir: Path) -> None:
    """Fail before any work when the tokenizer has ids the model has no embedding for (config.vocab_size)."""
    from transformers import AutoConfig

    try:
        rows = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    except Exception as exc:  # a broken config.json surfaces as many types
        raise HyperofaError(f"{model_dir}/config.json: cannot read ({exc.__class__.__name__})") from None
    check_vocabulary(len(load_tokenizer(model_dir)), rows, model_dir)


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))
