"""`hyperofa pipeline --dry-run`: the whole run resolved and checked before anything runs, and nothing written.

The plan is the pipeline's own (`pipeline.plan`: the same steps, the same per-step config variants). For it every
input is resolved and checked with the checks the stages make themselves (the preflight checks, beside their formats
and listed in `runtime/preflight.py`; the format readers, the launch and DeepSpeed config builders), each in
isolation, so one bad input does not hide the next: the corpus and its language codes, the source model and its
tokenizer, the target tokenizer (and that it belongs with the source: it shares the source's pieces), the word
vectors, the evaluation data of every task, the ranks and the optimizer step of both DeepSpeed jobs, and the disk
each stage will fill against the free space. What a check needs from an earlier stage's output (the prepare shards,
the mapping, the init models) does not exist yet and is estimated from the inputs instead.

Every problem is one line; all of them are printed and the exit status is 2. Without problems the plan goes to
stdout: resources, inputs, then one line per step with where it writes and about how much.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from .config import Config
from .errors import HyperofaError

T = TypeVar("T")

MIN_SHARED_PIECES = 0.10  # a target tokenizer sharing fewer of the source's pieces was made for another model
ESTIMATE_TASKS = {"mlm", "bpb", "fertility"}  # tasks that read the held-out shards, i.e. the corpus's languages
DATA_TASKS = ("srt", "srb", "pos", "ner")  # tasks that read evaluate.data_dir
LAYER_TASKS = {"srt", "srb"}  # tasks that read the hidden states of evaluate.layer


@dataclass
class Findings:
    """What the checks found: the problems (one line each) and the facts the plan prints."""

    problems: list[str] = field(default_factory=list)
    inputs: list[tuple[str, str]] = field(default_factory=list)
    resources: list[tuple[str, str]] = field(default_factory=list)

    def check(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Optional[T]:
        """fn's result, or None with its one-line refusal recorded."""
        try:
            return fn(*args, **kwargs)
        except HyperofaError as exc:
            line = str(exc)
            if line not in self.problems:
                self.problems.append(line)
            return None

    def problem(self, line: str) -> None:
        if line not in self.problems:
            self.problems.append(line)


@dataclass
class SourceFacts:
    path: Optional[Path]  # None: a hub name, resolved at run time
    kind: str  # masked or causal
    rows: int
    hidden: int
    parameters: int
    untied: bool
    layers: int  # transformer layers (evaluate.layer indexes their outputs)


def dry_run(config: Config) -> int:
    """Check and print the plan of `hyperofa pipeline`; 2 with one line per problem."""
    findings = Findings()
    steps = plan_steps(config, findings)
    if findings.problems:
        for line in findings.problems:
            print(f"hyperofa pipeline --dry-run: error: {line}", file=sys.stderr)
        print(f"hyperofa pipeline --dry-run: {len(findings.problems)} problem(s); nothing was run or written",
              file=sys.stderr)
        return 2
    print(render(config, findings, steps))
    return 0


def plan_steps(config: Config, findings: Findings) -> list[tuple[str, Path, Optional[int]]]:
    """(label, where it writes, estimated bytes or None) for every step of the pipeline, with `findings` filled."""
    from . import pipeline
    from .formats import hypernet as hypernet_format
    from .formats import init as init_format
    from .formats import pretrain as pretrain_format
    from .formats import results as results_format
    from .formats.rundir import Stage
    from .formats.shards import STAGE as PREPARE
    from .formats.tokenizer import STAGE as TOKENIZER
    from .formats.vectors import STAGE as VECTORS
    from .formats.files import free_space, used_bytes, writable
    from .formats.mapping import STAGE as MAPPING
    from .formats.shards import prepare_bytes

    run_dir = config.run_dir
    findings.check(writable, run_dir, "run.dir")
    sources, samples = corpus(config, findings)
    source = source_model(config, findings)
    source_tok = findings.check(_source_tokenizer, config)
    if source is not None and source_tok is not None:
        findings.check(source_tokenizer_fits, config, source, len(source_tok))
    target_size = target_tokenizer(config, findings, source_tok)
    vectors(config, findings)
    k = config.mapping.num_primitives
    if source is not None:
        from .factorize import check_rank

        findings.check(check_rank, k, (source.rows, source.hidden))
    evaluation(config, findings, source, [s.lang for s in sources or []])
    hyper_world = jobs(config, findings)

    steps: list[tuple[str, Path, Optional[int]]] = []
    new_rows = (target_size - source.rows) if source and target_size else None
    target_params = None
    if source and target_size:
        rows = _round_up(target_size, config.init.pad_to_multiple_of)
        target_params = source.parameters + (rows - source.rows) * source.hidden * (2 if source.untied else 1)
    for step in findings.check(pipeline.plan, config) or []:
        name = step.command.name
        estimate: Optional[int] = None
        if name == "tokenizer":
            where = Stage(run_dir, TOKENIZER).path
            estimate = _tokenizer_bytes(config, source_tok)
        elif name == "prepare":
            where = Stage(run_dir, PREPARE).path
            tokenizer = findings.check(_target_or_source_tokenizer, config) if samples else None
            estimate = prepare_bytes(samples, tokenizer, config) if samples and tokenizer else None
        elif name == "vectors":
            where = Stage(run_dir, VECTORS).path
        elif name == "mapping":
            where = Stage(run_dir, MAPPING).path
            estimate = (target_size + source.rows) * (k + 4) * 4 if source and target_size else None
        elif name == "hypernet":
            where = hypernet_format.stage_of(run_dir).path
            estimate = _hypernet_bytes(config, new_rows, hyper_world)
        elif name == "init":
            where = init_format.stage_of(run_dir, step.config.init.method).path
            estimate = target_params * 4 + (target_size or 0) * k * 4 if target_params else None
        elif name == "pretrain":
            where = pretrain_format.stage_of(run_dir, step.config.pretrain.method).path
            world = findings.check(_pretrain_world, step.config)
            estimate = pretrain_format.pretrain_bytes(target_params, step.config, world) if target_params and world else None
        elif name == "evaluate":
            where = results_format.stage_of(run_dir, step.config.evaluate.name).path
            estimate = 0
        else:  # compare
            from .compare.stage import output_dir_of

            where = output_dir_of(step.config)
            estimate = 0
        steps.append((step.label, where, estimate))
    total = sum(e for _, _, e in steps if e)
    if total:
        findings.check(free_space, _existing(run_dir), total, "the whole pipeline (estimated)",
                       reclaimable=used_bytes(run_dir))
    return steps


# --- inputs ---------------------------------------------------------------------------------------------------


def corpus(config: Config, findings: Findings) -> tuple[Optional[list], dict]:
    from .formats.corpus import checked_samples, discover
    from .formats.files import human
    from .langcodes import script_problem

    sources = findings.check(discover, config.corpus)
    if sources is None:
        return None, {}
    for source in sources:
        if script_problem(source.lang):
            findings.problem(f"{source.files[0] if source.files else config.corpus.hub_name}: corpus language "
                             f"{script_problem(source.lang)} (rename it, or list the languages in corpus.languages)")
    samples = findings.check(checked_samples, sources, config.corpus.max_noise_share) or {}
    size = sum(s.bytes for s in sources)
    where = config.corpus.path if config.corpus.format != "hub" else config.corpus.hub_name
    findings.inputs.append(("corpus", f"{config.corpus.format} {where}: {len(sources)} languages"
                            + (f", {human(size)}" if size else "")))
    return sources, samples


def _looks_local(name: str) -> bool:
    from .formats.tokenizer import _looks_like_path

    return Path(name).expanduser().exists() or _looks_like_path(name)


def source_model(config: Config, findings: Findings) -> Optional[SourceFacts]:
    from .formats.models import check_model, model_kind, read_model_config

    name = config.source.model
    if not _looks_local(name):
        findings.inputs.append(("source model", f"{name} (a hub name: resolved when the first stage loads it)"))
        return None
    path = Path(name).expanduser().resolve()
    cfg = findings.check(read_model_config, path) if (path / "config.json").is_file() else None
    if cfg is None:
        findings.problem(f"{path}: source model not found or not an HF model directory (source.model)")
        return None
    kind = findings.check(model_kind, cfg, path)
    if kind is None:
        return None
    own = config.source.tokenizer is None
    facts = findings.check(check_model, path, "source.model", mask=kind == "masked") if own else None
    parameters = facts.parameters if facts else findings.check(_parameters, path)
    if parameters is None:
        return None
    untied = kind == "causal" and not cfg.get("tie_word_embeddings", False)
    facts_ = SourceFacts(path, kind, int(cfg["vocab_size"]), int(cfg.get("hidden_size") or 0), parameters, untied,
                         int(cfg.get("num_hidden_layers") or 0))
    findings.inputs.append(("source model", f"{path}: {cfg.get('model_type')}, {kind} LM, {facts_.rows} embedding rows, "
                            f"hidden {facts_.hidden}, {parameters / 1e6:.1f}M parameters"))
    return facts_


def _parameters(path: Path) -> int:
    from .formats.models import weight_parameters

    return weight_parameters(path)


def _source_tokenizer(config: Config) -> Any:
    key = "source.tokenizer" if config.source.tokenizer else "source.model"
    return read_tokenizer(config.source.tokenizer or config.source.model, key)


def read_tokenizer(name: str, key: str) -> Any:
    """The tokenizer a stage will load, read without writing: a SentencePiece-only directory (Glot500's published
    tokenizer) is converted by the first stage that loads it, so here it is read through transformers' own class
    for it, the vocabulary and special tokens the conversion keeps (`read_sentencepiece`)."""
    from .formats.tokenizer import load_tokenizer, read_sentencepiece, sentencepiece_only

    if sentencepiece_only(name):
        return read_sentencepiece(Path(name), key)[4]
    return load_tokenizer(name, key)


def source_tokenizer_fits(config: Config, source: SourceFacts, size: int) -> None:
    from .formats.models import tokenizer_fits

    key = "source.tokenizer" if config.source.tokenizer else "source.model"
    tokenizer_fits(Path(config.source.tokenizer or config.source.model), size, source.rows, key)


def target_tokenizer(config: Config, findings: Findings, source_tok: Any) -> Optional[int]:
    """The target vocabulary's size: the given tokenizer's (checked to belong with the source), or the size the
    tokenizer stage will build (extend: source + new pieces; train: vocab_size)."""
    if config.tokenizer.path is None:
        if source_tok is None:
            return None
        if config.tokenizer.mode == "extend":
            from .tokenizer.build import check_ids_kept

            findings.check(check_ids_kept, source_tok, config.source.tokenizer or config.source.model)
            size = len(source_tok) + config.tokenizer.new_tokens
        else:
            size = config.tokenizer.vocab_size
        findings.inputs.append(("target tokenizer", f"built by the tokenizer stage ({config.tokenizer.mode}): "
                                f"at most {size} tokens"))
        return size
    from .formats.tokenizer import CONVERTED, sentencepiece_only, target_tokenizer_dir

    where = Path(config.tokenizer.path).expanduser().resolve()
    spm = sentencepiece_only(where)
    if not spm and findings.check(target_tokenizer_dir, config) is None:  # (writes nothing for such a folder)
        return None
    target = findings.check(read_tokenizer, str(where), "tokenizer.path")
    if target is None:
        return None
    shared = ""
    if source_tok is not None:
        share = findings.check(shared_pieces, target, source_tok, where)
        shared = f"; {share:.0%} of the source's pieces are in it (copied)" if share is not None else ""
    converted = (f"; SentencePiece only, converted once into {config.run_dir / CONVERTED}/ by the first stage "
                 "that loads it" if spm else "")
    findings.inputs.append(("target tokenizer", f"{where}: {len(target)} tokens{shared}{converted}"))
    return len(target)


def shared_pieces(target: Any, source: Any, where: Path) -> float:
    """Share of the source's pieces the target has (the tokens init copies); a target that shares almost none was
    made for another model, and the expanded model would start from nothing the source knows."""
    from .vocab import compute_overlap, special_ids

    overlap = compute_overlap(target, source)
    ordinary = max(1, len(source) - len(special_ids(source)))
    share = (overlap.stats["exact"] + overlap.stats["fuzzy"]) / ordinary
    if share < MIN_SHARED_PIECES:
        raise HyperofaError(
            f"{where}: the target tokenizer has {share:.1%} of the source tokenizer's pieces ({len(target)} tokens, "
            f"source {len(source)}): it belongs to another model than source.model (tokenizer.path)"
        )
    return share


def vectors(config: Config, findings: Findings) -> None:
    from .formats.files import human
    from .formats.text import parallel_corpus
    from .formats.vectors import resolve_vectors_path

    if config.vectors.path:
        path = findings.check(resolve_vectors_path, config)
        if path is not None:
            findings.inputs.append(("word vectors", f"{path}: {human(path.stat().st_size)}"))
        return
    from .vectors.train import corpus_languages

    settings = config.vectors.train
    root = settings.corpus or config.corpus.path
    if not root:
        findings.problem("vectors.path is unset, so the pipeline trains vectors, but neither vectors.train.corpus nor "
                         "corpus.path names a parallel corpus")
        return
    files = findings.check(corpus_languages, Path(root))
    lines = findings.check(parallel_corpus, files, settings.prefix_aligned) if files else None
    if lines:
        findings.inputs.append(("word vectors", f"trained on the parallel corpus {root}: {len(lines)} files, "
                                f"{max(lines.values())} lines"))


def evaluation(config: Config, findings: Findings, source: Optional[SourceFacts], corpus_languages: list[str]) -> None:
    """Every task's data exists and suits the model kind; requested languages exist where the task reads them."""
    if not config.pipeline.evaluate:
        return
    from .evaluate.languages import resolve
    from .evaluate.stage import check_tasks, task_data_dir

    ev = config.evaluate
    if source is not None and source.path is not None:
        findings.check(check_tasks, ev.tasks, source.kind, source.path)
    if source is not None and source.layers and LAYER_TASKS & set(ev.tasks):  # expanded models keep the layers
        from .evaluate.model import hidden_state_index

        findings.check(hidden_state_index, ev.layer, source.layers, source.path)
    needs_data = [t for t in ev.tasks if t in DATA_TASKS]
    if needs_data and not ev.data_dir:
        findings.problem(f"evaluate.data_dir is unset but tasks {', '.join(needs_data)} need benchmark files; the "
                         "pipeline would stop at its first evaluation")
    elif needs_data and not Path(ev.data_dir).is_dir():
        findings.problem(f"{Path(ev.data_dir).resolve()}: evaluate.data_dir not found (tasks {', '.join(needs_data)})")
    elif needs_data:
        found = [t for t in needs_data if findings.check(task_data_dir, ev.data_dir, t) is not None]
        findings.inputs.append(("evaluation data", f"{Path(ev.data_dir).resolve()}: {', '.join(found) or 'none'}"))
    if ev.languages and ESTIMATE_TASKS & set(ev.tasks) and corpus_languages:
        _, missing = resolve(ev.languages, corpus_languages, "not in the corpus")
        if missing:
            findings.problem(f"evaluate.languages: {', '.join(missing)} not in the corpus, so tasks "
                             f"{', '.join(sorted(ESTIMATE_TASKS & set(ev.tasks)))} have no held-out text for them")


def jobs(config: Config, findings: Findings) -> Optional[int]:
    """Ranks, DeepSpeed configs and the optimizer step of both jobs; the hypernet's world size."""
    hyper_world = None
    if "hyperofa" in config.pipeline.methods:
        from .hypernet.stage import build_ds_config as hypernet_ds_config
        from .runtime.device import job_device_type
        from .runtime.launch import planned_world_size

        hyper_world = findings.check(planned_world_size, config.hypernet, "hypernet")
        findings.check(hypernet_ds_config, config, job_device_type())
        if hyper_world:
            hp = config.hypernet
            findings.resources.append(("hypernet", f"{hyper_world} ranks, {hyper_world * hp.batch_size * hp.grad_accum} "
                                       f"tokens per optimizer step ({hp.batch_size} per micro-batch x {hp.grad_accum} "
                                       f"micro-batches x {hyper_world} ranks), {hp.epochs} epochs"))
    if config.pipeline.pretrain:
        world = findings.check(_pretrain_world, config)
        if world:
            from .pretrain.stage import batch_plan

            plan = findings.check(batch_plan, config, world)
            if plan:
                accum, global_batch = plan
                findings.check(_pretrain_ds_config, config.with_changes({"pretrain.grad_accum": accum}))
                p = config.pretrain
                findings.resources.append((
                    "pretrain", f"{world} ranks, {global_batch} sequences per optimizer step ({p.micro_batch_size} "
                    f"per micro-batch x {accum} micro-batches x {world} ranks), {p.steps} steps, "
                    f"{p.steps * global_batch * config.prepare.block_size / 1e9:.2f}B tokens"))
    ray = config.ray.address or f"a local Ray with {config.ray.num_cpus} CPUs"
    findings.resources.append(("ray (prepare, mapping)", ray))
    return hyper_world


def _pretrain_world(config: Config) -> int:
    from .runtime.launch import planned_world_size

    return planned_world_size(config.pretrain, "pretrain")


def _pretrain_ds_config(config: Config) -> None:
    from .pretrain.stage import build_ds_config
    from .runtime.device import job_device_type, resolve_precision

    build_ds_config(config, resolve_precision(config.pretrain.precision, job_device_type(), "pretrain.precision"))


# --- estimates ------------------------------------------------------------------------------------------------


def _target_or_source_tokenizer(config: Config) -> Any:
    """The tokenizer prepare will use, or the source's while the pipeline has still to build it."""
    if config.tokenizer.path is not None:
        return read_tokenizer(str(Path(config.tokenizer.path).expanduser()), "tokenizer.path")
    return _source_tokenizer(config)


def _tokenizer_bytes(config: Config, source_tok: Any) -> Optional[int]:
    from .formats.tokenizer import TOKENIZER_JSON

    where = Path(config.source.tokenizer or config.source.model) / TOKENIZER_JSON
    if source_tok is None or not where.is_file():
        return None
    grow = (len(source_tok) + config.tokenizer.new_tokens if config.tokenizer.mode == "extend"
            else config.tokenizer.vocab_size) / len(source_tok)
    return int(where.stat().st_size * grow)


def _hypernet_bytes(config: Config, new_rows: Optional[int], world: Optional[int]) -> Optional[int]:
    """Predictions for the new rows, and the kept checkpoints when the vectors' dimension is known (trained here)."""
    if new_rows is None:
        return None
    k = config.mapping.num_primitives
    total = max(new_rows, 0) * k * 4 * 2
    if config.vectors.path is None and world:
        import torch

        from .method.hypernet.models import model_from_spec, model_spec, trainable_parameters
        from .formats.jobdir import checkpoint_bytes

        with torch.device("meta"):
            model = model_from_spec(model_spec(config.hypernet, word_dim=config.vectors.train.dim, k=k))
        hp = config.hypernet
        saves = len({*range(hp.checkpoint_every - 1, hp.epochs, hp.checkpoint_every), hp.epochs - 1})
        kept = hp.keep_checkpoints if hp.keep_checkpoints is not None else saves  # unset: every one
        total += kept * checkpoint_bytes(trainable_parameters(model), world)
    return total


def _round_up(n: int, multiple: Optional[int]) -> int:
    return -(-n // multiple) * multiple if multiple else n


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- the plan -------------------------------------------------------------------------------------------------


def render(config: Config, findings: Findings, steps: list[tuple[str, Path, Optional[int]]]) -> str:
    from .formats.files import free_bytes, human

    run_dir = config.run_dir
    lines = [f"plan of `hyperofa pipeline` (nothing was run or written); run.dir {run_dir}", "", "resources:"]
    lines += [f"  {name:24s} {text}" for name, text in findings.resources]
    lines += ["", "inputs:"]
    lines += [f"  {name:24s} {text}" for name, text in findings.inputs]
    lines += ["", "steps:"]
    for index, (label, where, estimate) in enumerate(steps, 1):
        size = "?" if estimate is None else ("small" if estimate < 1 << 20 else f"~{human(estimate)}")
        shown = where.relative_to(run_dir) if where.is_relative_to(run_dir) else where
        lines.append(f"  {index:2d}. {label:24s} -> {str(shown) + '/':36s} {size}")
    total = sum(e for _, _, e in steps if e)
    lines += ["", f"disk: ~{human(total)} in all (stages marked ? not counted); {human(free_bytes(_existing(run_dir)))} "
              f"free at {_existing(run_dir)}"]
    return "\n".join(lines)
