"""`hyperofa tokenizer`: build the target tokenizer from the corpus and save it in HF format.

The stage shell around `build` and `learn`: load the source tokenizer (`source.tokenizer`, else `source.model`),
read the first `tokenizer.sentences_per_language` sentences of every corpus language, extend or train, save
into `<run_dir>/tokenizer/` (built in a sibling temporary directory, checked, then renamed into place), write
the manifest last and log counts and per-language fertility to MLflow. With `tokenizer.path` set there is
nothing to build (that tokenizer is the target): the stage says so and builds nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..formats.corpus import checked_samples, discover
from ..formats.models import source_vocabulary
from ..formats.rundir import Stage
from ..formats.tokenizer import SAMPLE_FILE, STAGE, build_dir, file_settings, source_tokenizer
from ..runtime.stage import StageShell, say
from .build import (
    build_target,
    check_ids_kept,
    describe,
    refuse_train_bpe,
    read_sample,
    save_hf,
    source_fingerprint,
    special_roles,
    verify_hf,
)



def _swap_into_place(built: Path, final: Path) -> None:
    """Replace `final` by `built` with renames only: `final` is either the old or the new directory, never half."""
    old = final.with_name(f".{final.name}.old-{socket.gethostname()}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    if old.exists():
        shutil.rmtree(old)


def run(config: Config, tracker: Any) -> int:
    if config.tokenizer.path is not None:
        # The given tokenizer (Glot500's, in the packaged configs) is the target every later stage reads; one built
        # here would be read by none (the pipeline leaves this stage out for it) and can take hours on a real corpus.
        say(STAGE, f"nothing to build: tokenizer.path is set ({config.tokenizer.path}), every later stage reads that "
                   "tokenizer; unset it to build one here")
        return 0
    sources = discover(config.corpus)
    checked_samples(sources, config.corpus.max_noise_share)
    source = source_tokenizer(config)
    source_vocabulary(config, source)
    if config.tokenizer.mode == "extend":
        check_ids_kept(source, config.source.tokenizer or config.source.model)
    elif config.tokenizer.model_type == "bpe":
        refuse_train_bpe(source, "source.tokenizer" if config.source.tokenizer else "source.model")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    build = build_dir(config.run_dir)
    if build.is_symlink():  # a predictable name: a link planted there goes, never what it points to
        build.unlink()
    elif build.exists():
        shutil.rmtree(build)
    build.mkdir()
    try:
        started = time.perf_counter()
        sample = read_sample(config, sources, build / SAMPLE_FILE)
        sample_s = time.perf_counter() - started
        inputs = {
            "source_tokenizer": source_fingerprint(source),
            "corpus_sample": sample.sha256,
            "config": config.fingerprint("tokenizer", "prepare.normalization"),
        }
        with StageShell.open(config, tracker, STAGE, Stage(config.run_dir, STAGE), inputs) as shell:
            if shell.up_to_date:
                return 0
            started = time.perf_counter()
            target, info = build_target(config, source, sample.file)
            build_s = time.perf_counter() - started
            sample.file.path.unlink()

            roles = special_roles(source)
            max_length = inputs["source_tokenizer"]["model_max_length"]
            files = save_hf(target, roles, max_length, build)
            check_texts = [s for lang in sorted(sample.heads) for s in sample.heads[lang][:50]]
            verify_hf(build, target, roles, check_texts, name=f"the target tokenizer of {shell.path}")

            counts, extra = describe(config, source, target, info, sample)
            ignored = file_settings(config.source.tokenizer or config.source.model)
            if ignored:
                extra["source_settings_ignored"] = ignored
                shell.say(f"ignored the source tokenizer's {' and '.join(sorted(ignored))} (every stage tokenizes whole "
                          "sentences); the target has neither")
            shell.begin()
            _swap_into_place(build, shell.path)
            manifest = shell.finish(outputs=files, counts=counts, extra=extra)
            _log(shell.run, manifest, sample_s, build_s)
            shell.run.log_artifact(shell.stage.manifest_path)
    finally:
        if build.exists():
            shutil.rmtree(build)
    shell.say(f"{config.tokenizer.mode}: {counts['source_size']} -> {counts['target_size']} tokens in {shell.path}")
    return 0


def _log(tracker: Any, manifest: dict[str, Any], sample_s: float, build_s: float) -> None:
    counts = manifest["counts"]
    metrics = {k: v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update(sample_s=sample_s, build_s=build_s, languages=len(counts["sample_sentences"]))
    for lang, report in manifest["fertility"].items():
        for key, value in report.items():
            metrics[f"{key}/{lang}"] = value
        metrics[f"sample_sentences/{lang}"] = counts["sample_sentences"][lang]
    tracker.log_metrics(metrics)
    tracker.set_tags({"hyperofa.up_to_date": "false", "hyperofa.shortfall": manifest.get("shortfall") or ""})
