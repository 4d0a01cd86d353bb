"""`hyperofa evaluate`: run the selected tasks on one model, write `{task: {lang: {metric}, "average": {...}}}`.

The model is an HF directory or a run stage (`init/hyperofa` -> `<run.dir>/init/hyperofa/model`). Benchmark data
sits in task sub-directories of `evaluate.data_dir`; the mlm task reads the held-out shards of `prepare`. The
stage directory `<run.dir>/evaluate/<name>/` holds results.json and the manifest (inputs: the evaluate config,
the model's and the data's fingerprints), so re-running the same evaluation is a no-op. Metrics go to MLflow as
`<task>.<lang>.<metric>` and `<task>.average.<metric>` at step `evaluate.step`, in a run named
`evaluate/<method>@<step>` (`evaluate/<name>@<step>` when the model's method is unknown) and tagged with
`init.method` and `hyperofa.step`, so `hyperofa compare` can place it. `evaluate.languages` holds one code per
language (`deu_Latn`); each task maps it to its data's own code (`languages.resolve`) and reports under the
requested one.

A causal LM (the model's config decides, `formats.models.model_kind`) is evaluated on srt/srb (mean-pooled text
tokens, BOS left out), bpb (held-out bits per byte) and fertility (source vs the model's tokenizer on the held-out
text) (evaluate/causal.py); pos, ner and mlm are masked-LM tasks and refused for it before any work, bpb for a
masked LM.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..config import CAUSAL_TASKS, Config, flatten
from ..errors import HyperofaError
from ..formats import results as out_format
from ..formats.files import output_file, sha256_file
from ..formats import init as init_format
from ..formats import pretrain as pretrain_format
from ..formats.models import check_model, load_model, model_fingerprint, read_model_config
from ..formats.shards import check_shards, find_shardset, first_blocks, heldout_shards, prepare_dir, shards_by_language
from ..formats.tokenizer import STAGE as TOKENIZER_STAGE
from ..formats.tokenizer import ignored_settings, load_tokenizer
from ..models import base_model_kwargs
from ..models.mlm import mlm_loss_per_language
from ..runtime.device import resolve_device
from ..runtime.stage import StageShell, inputs_digest
from ..tracking import METHOD_TAG, STEP_TAG
from . import retrieval, tagging
from .languages import resolve
from .model import check_model_vocabulary, hidden_state_index, resolve_model_dir

TASK_DIRS = {"srt": ("srt", "tatoeba"), "srb": ("srb", "bible"), "pos": ("pos", "udpos"), "ner": ("ner", "panx")}
MAIN_METRIC = {"srt": "top10", "srb": "top10", "pos": "f1", "ner": "f1", "mlm": "loss", "bpb": "bpb",
               "fertility": "fertility_target"}
MASKED_ONLY = ("pos", "ner", "mlm")
CAUSAL_ONLY = ("bpb",)
HELDOUT_TASKS = ("mlm", "bpb", "fertility")


def model_kind_of(model_dir: Path) -> str:
    """"masked", "causal", or "unknown" for an encoder of another kind (retrieval still reads its hidden states)."""
    from ..formats.models import model_kind_of as kind_of

    try:
        return kind_of(model_dir)
    except HyperofaError:
        return "unknown"


def check_tasks(tasks: list[str], kind: str, model_dir: Path) -> None:
    """Refuse, before any work, a task the model cannot do: tagging and MLM need a masked LM, bpb a causal LM."""
    if kind == "causal":
        wrong = [t for t in tasks if t in MASKED_ONLY]
        if wrong:
            raise HyperofaError(
                f"evaluate.tasks: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for masked LMs (MLM-only); "
                f"{model_dir} is a causal LM: its tasks are {', '.join(CAUSAL_TASKS)}"
            )
    elif kind == "masked":
        wrong = [t for t in tasks if t in CAUSAL_ONLY]
        if wrong:
            raise HyperofaError(
                f"evaluate.tasks: {', '.join(wrong)} needs a causal LM; {model_dir} is a masked LM (use mlm)"
            )


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


def default_name(model_dir: Path, run_dir: Path) -> str:
    """`init/hyperofa/model` under the run dir -> `init-hyperofa`; an outside directory -> its own name."""
    try:
        parts = list(model_dir.relative_to(run_dir).parts)
    except ValueError:
        parts = [model_dir.parent.name, model_dir.name] if model_dir.name == init_format.MODEL else [model_dir.name]
    if len(parts) > 1 and parts[-1] == init_format.MODEL:
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "model"


def run_name(method: Optional[str], name: str, step: int) -> str:
    """`evaluate/<method>@<step>` (`evaluate/ofa@4000`); `evaluate/<name>@<step>` for a model of unknown method."""
    return f"evaluate/{method or name}@{step}"


def _files_fingerprint(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _heldout_dir(config: Config) -> Path:
    return Path(config.evaluate.heldout_dir) if config.evaluate.heldout_dir else prepare_dir(config.run_dir)


def heldout_tokenizer_dir(config: Config, model_dir: Path) -> tuple[str, Path]:
    """(config key, directory) of the tokenizer that made the held-out shards, by the sha256 prepare recorded:
    `evaluate.heldout_tokenizer` when set, else the first match of the model's, `tokenizer.path` and
    `<run.dir>/tokenizer` (a source model is evaluated on the text of the expanded model's shards)."""
    from .causal import shards_tokenizer

    from ..formats.tokenizer import tokenizer_dir

    heldout = _heldout_dir(config)
    shardset = find_shardset(heldout)
    recorded = shardset.tokenizer_sha256 if shardset else None
    ev = config.evaluate

    def given(key: str, where: Optional[str]) -> Optional[Path]:  # a SentencePiece-only one by its converted copy
        return tokenizer_dir(where, config.run_dir, key) if where else None

    if ev.heldout_tokenizer:
        candidates = [("evaluate.heldout_tokenizer", given("evaluate.heldout_tokenizer", ev.heldout_tokenizer))]
    else:
        candidates = [("evaluate.model", model_dir),
                      ("tokenizer.path", given("tokenizer.path", config.tokenizer.path)),
                      (f"<run.dir>/{TOKENIZER_STAGE}", config.run_dir / TOKENIZER_STAGE)]
    return shards_tokenizer(heldout, recorded, candidates)


def _inputs(config: Config, model_dir: Path) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "config": config.fingerprint("evaluate", "run"),
        "model": model_fingerprint(model_dir),
        "data": {},
    }
    tasks = config.evaluate.tasks
    if {"bpb", "fertility"} & set(tasks):
        from ..formats.tokenizer import tokenizer_fingerprint

        inputs["heldout_tokenizer"] = tokenizer_fingerprint(heldout_tokenizer_dir(config, model_dir)[1])
    if "fertility" in tasks:
        inputs["source"] = _source_tokenizer_identity(config)
    for task in tasks:
        if task in HELDOUT_TASKS:
            inputs["data"][task] = {p.name: sha256_file(p) for p in heldout_shards(_heldout_dir(config))}
        else:
            inputs["data"][task] = _files_fingerprint(task_data_dir(config.evaluate.data_dir, task))
    from ..formats.init import FACTORS, factors_beside

    beside = factors_beside(model_dir)
    if beside is not None and {"pos", "ner"} & set(config.evaluate.tasks):
        inputs["factors"] = {name: sha256_file(beside / name) for name in FACTORS}  # tagging may fine-tune them
    return inputs


def _source_tokenizer_identity(config: Config) -> dict[str, Any]:
    from ..formats.tokenizer import tokenizer_dir, tokenizer_fingerprint

    where = config.source.tokenizer or config.source.model
    key = "source.tokenizer" if config.source.tokenizer else "source.model"
    if not Path(where).is_dir():
        return {"tokenizer": where}
    return {"files": tokenizer_fingerprint(tokenizer_dir(where, config.run_dir, key))}


def _heldout_languages(config: Config, task: str) -> tuple[dict[str, str], dict[str, list[Path]], dict[str, str]]:
    """({requested code: the shards' code}, {shards' code: its held-out shards}, {skipped code: why})."""
    ev = config.evaluate
    by_lang = shards_by_language(heldout_shards(_heldout_dir(config)))
    if ev.languages is None:
        return {lang: lang for lang in by_lang}, by_lang, {}
    chosen, skipped = resolve(ev.languages, by_lang, "no held-out blocks")
    if not chosen:
        raise HyperofaError(f"{_heldout_dir(config)}: no held-out shards for the requested languages ({task})")
    return chosen, by_lang, skipped


def heldout_texts(config: Config, model_dir: Path) -> tuple[dict[str, list[str]], dict[str, str], dict[str, float]]:
    """({requested code: the first evaluate.heldout_sentences held-out lines as text}, {skipped code: why},
    {language-prefixed counts of lossy lines}) for bpb and fertility (evaluate/causal.py)."""
    from ..models.causal import recorded_frame
    from .causal import decode_lines, heldout_lines

    _, tokenizer_dir = heldout_tokenizer_dir(config, model_dir)
    made_with = load_tokenizer(tokenizer_dir)
    shardset = find_shardset(_heldout_dir(config))
    frame = recorded_frame(shardset.special_tokens if shardset else None, made_with, tokenizer_dir)
    chosen, by_lang, skipped = _heldout_languages(config, "bpb/fertility")
    texts: dict[str, list[str]] = {}
    lossy: dict[str, float] = {}
    for key, code in chosen.items():
        lines = heldout_lines(by_lang[code], frame, config.evaluate.heldout_sentences)
        if not lines:
            skipped[key] = "no whole held-out line"
            continue
        texts[key], lossy[key] = decode_lines(made_with, lines)
    if not texts:
        raise HyperofaError(f"{_heldout_dir(config)}: no whole held-out line in any requested language")
    return texts, skipped, lossy


@dataclass
class TaskRun:
    """One evaluation's shared state: the model's tokenizer and device, and what more than one task loads once."""

    config: Config
    model_dir: Path
    tokenizer: Any
    device: Any
    causal: bool
    _encoder: Any = None
    _texts: Any = None

    def encoder(self) -> Any:
        if self._encoder is None:
            kwargs = base_model_kwargs(read_model_config(self.model_dir))
            self._encoder = load_model(self.model_dir, "AutoModel", **kwargs).to(self.device)
            check_model_vocabulary(self.tokenizer, self._encoder, self.model_dir)
        return self._encoder

    def texts(self) -> tuple[dict[str, list[str]], dict[str, str], dict[str, float]]:
        if self._texts is None:
            self._texts = heldout_texts(self.config, self.model_dir)
        return self._texts

    def model(self, auto_class: str) -> Any:
        model = load_model(self.model_dir, auto_class).to(self.device)
        check_model_vocabulary(self.tokenizer, model, self.model_dir)
        return model


# A task: (per-language metrics, skipped languages with why, extra metrics).
TaskResult = tuple[dict[str, dict[str, float]], dict[str, str], dict[str, float]]


def _retrieval(r: TaskRun, task: str) -> TaskResult:
    ev = r.config.evaluate
    encoder = r.encoder()
    layer = hidden_state_index(ev.layer, encoder.config.num_hidden_layers, r.model_dir)
    per_language, skipped = retrieval.evaluate_retrieval(
        encoder, r.tokenizer, task_data_dir(ev.data_dir, task), layer_index=layer, center=ev.center,
        languages=ev.languages, batch_size=ev.batch_size, max_length=ev.max_length, max_sentences=ev.max_sentences,
        device=r.device, task=task, pool_special=not r.causal,
    )
    return per_language, skipped, {}


def _bpb(r: TaskRun, task: str) -> TaskResult:
    from . import causal as causal_eval

    ev = r.config.evaluate
    texts, skipped, lossy = r.texts()
    model = r.model("AutoModelForCausalLM")
    per_language = {
        lang: {**causal_eval.bits_per_byte(model, r.tokenizer, lines, batch_size=ev.bpb_batch_size,
                                           chunk=ev.loss_chunk, device=r.device, where=r.model_dir),
               "lossy": lossy[lang]}
        for lang, lines in texts.items()
    }
    return per_language, dict(skipped), {}


def _fertility(r: TaskRun, task: str) -> TaskResult:
    from ..formats.tokenizer import source_tokenizer
    from . import causal as causal_eval

    texts, skipped, _ = r.texts()
    source = source_tokenizer(r.config)
    return {lang: causal_eval.fertility(source, r.tokenizer, lines) for lang, lines in texts.items()}, dict(skipped), {}


def _tagging(r: TaskRun, task: str) -> TaskResult:
    from ..models.factorised import plan_factorised

    ev, t = r.config.evaluate, r.config.evaluate.tagging
    settings = tagging.TaggingSettings(
        epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, max_length=t.max_length, weight_decay=t.weight_decay,
        seed=r.config.run.seed if t.seed is None else t.seed, max_train_sentences=t.max_train_sentences,
        max_test_sentences=ev.max_sentences, select_every=t.select_every, score_unit=t.score_unit,
        factors_dir=plan_factorised(r.model_dir, t.embeddings, "evaluate.tagging.embeddings"),
    )
    outcome = tagging.evaluate_tagging(
        r.model_dir, r.tokenizer, task_data_dir(ev.data_dir, task), task, english=ev.english,
        languages=ev.languages, settings=settings, device=r.device,
    )
    extra = {f"{task}.english_dev.f1": outcome.dev_f1, f"{task}.best_step": float(outcome.best_step),
             f"{task}.steps": float(outcome.steps), f"{task}.factorised": float(outcome.factorised)}
    return outcome.per_language, outcome.skipped, extra


def _mlm(r: TaskRun, task: str) -> TaskResult:
    ev, heldout = r.config.evaluate, _heldout_dir(r.config)
    model = r.model("AutoModelForMaskedLM")
    by_lang = shards_by_language(heldout_shards(heldout))
    if ev.languages is None:
        chosen, skipped = {lang: lang for lang in by_lang}, {}
    else:  # corpus codes (deu_Latn) or a bare ISO code that names one of them
        chosen, skipped = resolve(ev.languages, by_lang, "no held-out blocks")
    blocks = first_blocks(sorted(p for code in chosen.values() for p in by_lang[code]), ev.mlm_blocks, chosen.values())
    skipped |= {key: "no held-out blocks" for key, code in chosen.items() if code not in blocks}
    if not blocks:
        raise HyperofaError(f"{heldout}: no held-out blocks for the requested languages")
    # Masks are seeded by the shards' own code, as in the pretraining job's evaluations; results and skips are
    # reported under the requested code.
    by_code, unscored = mlm_loss_per_language(
        model, r.tokenizer, blocks, seed=r.config.run.seed, probability=ev.mlm_probability,
        batch_size=ev.mlm_batch_size, device=r.device,
    )
    per_language = {key: by_code[code] for key, code in chosen.items() if code in by_code}
    skipped |= {key: unscored[code] for key, code in chosen.items() if code in unscored}
    if not per_language:
        raise HyperofaError(f"{heldout}: no held-out token was masked in any language")
    return per_language, skipped, {}


TASKS: dict[str, Callable[[TaskRun, str], TaskResult]] = {
    "srt": _retrieval, "srb": _retrieval, "bpb": _bpb, "fertility": _fertility, "pos": _tagging, "ner": _tagging,
    "mlm": _mlm,
}


def evaluate_model(
    config: Config, model_dir: Path
) -> tuple[dict[str, Any], dict[str, dict[str, str]], dict[str, float]]:
    """(results, skipped languages per task, extra metrics such as tagging selection and timings)."""
    ev = config.evaluate
    tokenizer = load_tokenizer(model_dir)
    run = TaskRun(config, model_dir, tokenizer, resolve_device(ev.device, "evaluate.device"),
                  model_kind_of(model_dir) == "causal")
    results: dict[str, Any] = {}
    skipped: dict[str, dict[str, str]] = {}
    extra: dict[str, float] = {}
    for task in ev.tasks:
        started = time.perf_counter()
        per_language, skipped[task], task_extra = TASKS[task](run, task)
        extra.update(task_extra)
        results[task] = with_average(per_language)
        extra[f"time/{task}_s"] = time.perf_counter() - started
        for lang, reason in sorted(skipped.get(task, {}).items()):
            print(f"hyperofa evaluate: {task}: skipped {lang} ({reason})", file=sys.stderr)
    return results, skipped, extra


def current_results(config: Config) -> Optional[dict[str, Any]]:
    """The results of the evaluation this config describes, when its stage is complete for the current inputs (the
    model's content, the data, the settings); None when the model does not exist or the results are of other
    inputs. Nothing is evaluated."""
    try:
        model_dir = resolve_model_dir(config.evaluate.model, config.run_dir)
        name = config.evaluate.name or default_name(model_dir, config.run_dir)
        expected = inputs_digest(config, _inputs(config, model_dir))
    except HyperofaError:
        return None
    return out_format.find_results(config.run_dir, name, expected)


def run(config: Config, tracker: Any) -> int:
    ev = config.evaluate
    model_dir = resolve_model_dir(ev.model, config.run_dir)
    name = ev.name or default_name(model_dir, config.run_dir)
    stage = out_format.stage_of(config.run_dir, name)
    method = ev.init_method or init_format.method_of(model_dir) or pretrain_format.method_of(model_dir)
    check_tasks(ev.tasks, model_kind_of(model_dir), model_dir)  # a causal LM asked for mlm: that, not "no mask token"
    check_model(model_dir, "evaluate.model", mask="mlm" in ev.tasks)
    if "mlm" in ev.tasks:
        heldout = _heldout_dir(config)
        check_shards(heldout_shards(heldout), heldout, verify=config.run.verify_inputs, block_size=None)
    inputs = _inputs(config, model_dir)
    results_path = stage.path / out_format.RESULTS
    output = Path(ev.output).resolve() if ev.output else results_path
    if output != results_path:
        output_file(output, "evaluate.output")
    tags = {STEP_TAG: ev.step, "evaluate.name": name, "evaluate.model": str(model_dir)}
    if method:
        tags[METHOD_TAG] = method
    with StageShell.open(config, tracker, "evaluate", stage, inputs, run_name=run_name(method, name, ev.step),
                         tags=tags) as shell:
        if shell.up_to_date:
            if output != results_path:
                out_format.write_results(output, out_format.read_results(results_path))
            return 0
        run_ = shell.run
        shell.begin()
        results, skipped, extra = evaluate_model(config, model_dir)
        out_format.write_results(results_path, results)
        if output != results_path:
            out_format.write_results(output, results)
        run_.log_metrics({**flatten(results), **extra}, step=ev.step)  # task.lang.metric
        flat_skipped = {f"{t}:{l}": r for t, langs in skipped.items() for l, r in langs.items()}
        if flat_skipped:
            run_.set_tags({"evaluate.skipped": ", ".join(sorted(flat_skipped))})
        run_.log_artifact(results_path)
        shell.finish(
            outputs=[out_format.RESULTS],
            counts={task: len(langs) - 1 for task, langs in results.items()},
            extra={"skipped": skipped, "init_method": method, "step": ev.step,
                   **ignored_settings({"model": model_dir}, shell.say)},
        )
    summary = ", ".join(
        f"{task} {MAIN_METRIC[task]}={values['average'][MAIN_METRIC[task]]:.2f}" for task, values in results.items()
    )
    shell.say(f"{name}: {summary} -> {output}")
    return 0

