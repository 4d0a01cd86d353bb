"""Preflight: what every stage checks before it launches a process or starts expensive work, in one place.

Each check reads only what it must (headers, indexes, line counts, a sample of the corpus) and fails with one
`HyperofaError` line naming the file and the key to change. The stage functions call them while resolving their
inputs, before `StageShell.open`, so a refused run opens no MLflow run and writes nothing:

| check                | what it refuses                                                          | called by          |
|----------------------|--------------------------------------------------------------------------|--------------------|
| `run_dir`            | a run directory (or local MLflow store) that cannot be written           | cli, every command |
| `model`              | a model directory without weights or tokenizer, truncated weights, a     | pretrain, evaluate |
|                      | tokenizer of another size than the embedding, special ids out of range   |                    |
| `shards`             | a shard whose size differs from the prepare manifest, whose tar or .npy  | pretrain, evaluate |
|                      | headers do not parse, whose blocks differ; with `run.verify_inputs`,     |                    |
|                      | any byte that differs (sha256)                                           |                    |
| `free_space`         | less free space than the stage's estimated output                        | prepare, pretrain  |
| `parallel_corpus`    | parallel files with different line counts                                | vectors train      |
| `corpus_text`        | a language whose sample is mostly invalid UTF-8 or not letters           | tokenizer, prepare |

The tracking URI's scheme is checked when the config is read (`config.check_tracking_uri`).
"""

from __future__ import annotations

import collections
import gzip
import os
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..errors import HyperofaError
from ..formats.corpus import LanguageSource, TextSample, sample_text
from ..formats.files import free_bytes, sha256_file
from ..formats.models import CONFIG, read_model_config, weight_parameters
from ..formats.rundir import MANIFEST
from ..formats.shards import index_shard
from ..formats.text import count_line_ends, split_lines
from ..formats.tokenizer import TOKENIZER_JSON, load_tokenizer

# --- the run directory -----------------------------------------------------------------------------------------


def run_dir(config: Any, command: str) -> None:
    """Every directory the command will write is writable: the run directory (stages, pipeline, demo), compare's
    output, and a local MLflow store (sqlite file or file store), which MLflow would otherwise retry for minutes
    before failing with a database traceback."""
    from ..registry import COMMANDS

    writers = {entry.name for entry in COMMANDS if entry.is_stage} | {"pipeline", "demo"}
    targets: list[tuple[Path, str]] = []
    if command in writers:
        targets.append((config.run_dir, "run.dir"))
    if command == "compare":
        out = config.compare.output_dir
        targets.append((Path(out).resolve(), "compare.output_dir") if out else (config.run_dir, "run.dir"))
    store = tracking_store_dir(config)
    if store is not None:
        targets.append((store, "tracking.tracking_uri" if config.tracking.tracking_uri else "run.dir"))
    for path, key in targets:
        writable(path, key)


def tracking_store_dir(config: Any) -> Optional[Path]:
    """The local directory MLflow writes (the sqlite file's, or a file store), or None for a server/no tracking."""
    if not config.tracking.enabled:
        return None
    uri = config.tracking.tracking_uri
    if uri is None:
        return config.run_dir
    if uri.startswith("sqlite:///"):
        # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's spelling), maybe with ?options
        return Path(uri[len("sqlite:///") :].split("?", 1)[0]).absolute().parent
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).absolute()
    if "://" not in uri and uri != "databricks":
        return Path(uri).absolute()
    return None


def writable(path: Path, key: str) -> None:
    """`path` is (or can be created as) a writable directory: a file is created and removed in it, or in its
    nearest existing parent (permission bits say nothing to root or on a read-only mount; a write does)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise HyperofaError(f"{probe}: not a directory, so {path} cannot be created ({key})")
    try:
        handle, name = tempfile.mkstemp(prefix=".hyperofa-preflight-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == Path(path).absolute() else f" (its parent {probe})"
        raise HyperofaError(f"{path}: not writable{where}: {exc.strerror or exc.__class__.__name__} ({key})") from None


def output_file(path: Path, key: str) -> None:
    """`path` can be written as a file: it is not a directory, and its nearest existing parent is a writable
    directory (not a file), checked before the work whose result it will hold."""
    if path.is_dir():
        raise HyperofaError(f"{path}: is a directory; {key} names the file to write")
    writable(path.parent, key)


# --- free space ------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def used_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what a re-run may overwrite in place)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def free_space(where: Path, needed: int, what: str, reclaimable: int = 0) -> None:
    """At least `needed` bytes free (counting `reclaimable` bytes a re-run overwrites) on `where`'s filesystem."""
    free = free_bytes(where)
    if free + reclaimable < needed:
        raise HyperofaError(
            f"{where}: {what} needs about {human(needed)}, the filesystem has {human(free)} free; free space or "
            "move run.dir"
        )


ESTIMATE_BYTES = 1 << 15  # text per corpus file tokenized for prepare's estimate


def _token_count(tokenizer: Any, sentences: list[str]) -> int:
    """Tokens of the sentences without specials, through the Rust backend when there is one (no Python id lists)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return sum(len(e) for e in backend.encode_batch_fast(sentences, add_special_tokens=False))
    return sum(len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"])


def prepare_bytes(samples: dict[str, list[TextSample]], tokenizer: Any, config: Any) -> int:
    """Estimated bytes of prepare's shards, from the corpus samples: tokens per byte of each file (plus a
    separator per sentence) scaled to the whole file, framed into blocks, packed into samples and shards as
    `formats.shards` writes them (512-byte tar headers and padding, a .npy header per sample, each shard's end
    blocks and padding to a 10 KiB tar record, a partial shard per chunk and split), scaled by a sentence budget
    when one is set (temperature sampling moves sentences between languages, not their total), plus a tenth (a
    quarter with a budget)."""
    import math
    import tarfile

    prep = config.prepare
    per_lang: dict[str, tuple[float, float, int]] = {}
    for lang, per_file in samples.items():
        tokens = lines = 0.0
        chunks = 0
        for sample in per_file:
            if sample.sample_bytes == 0:
                continue
            sentences = [line for line in split_lines(sample.text) if line.strip()]
            if not sentences:  # whitespace only: prepare skips the language, as it does an empty file
                continue
            # Every stride-th sentence, about ESTIMATE_BYTES of the sample: the ratio of tokens to bytes needs no
            # more, and on a corpus of a few hundred MB tokenizing whole samples would be a tenth of the stage.
            sentences = sentences[:: max(1, sample.sample_bytes // ESTIMATE_BYTES)]
            used = sum(len(line.encode("utf-8")) + 1 for line in sentences)
            counted = _token_count(tokenizer, sentences)
            scale = sample.total_bytes / max(used, 1)
            tokens += (counted + len(sentences)) * scale
            lines += len(sentences) * scale
            chunks += math.ceil(sample.total_bytes / prep.chunk_bytes)
        per_lang[lang] = (tokens, lines, chunks)
    budget = prep.sampling.total_sentences
    all_lines = sum(lines for _, lines, _ in per_lang.values())
    scale = budget / all_lines if budget is not None and all_lines > 0 else 1.0
    block = tarfile.BLOCKSIZE
    ids_bytes = 128 + prep.blocks_per_sample * prep.block_size * 4
    sample_bytes = 4 * block + math.ceil(ids_bytes / block) * block  # two headers, lang.txt padded, ids padded
    shard_end = 2 * block + tarfile.RECORDSIZE // 2  # end-of-archive blocks, on average half a record of padding
    total = 0.0
    for tokens, _, chunks in per_lang.values():
        blocks = tokens * scale / (prep.block_size - 2)
        for heldout, share in ((False, 1 - prep.heldout_fraction), (True, prep.heldout_fraction)):
            split_blocks = blocks * share
            if heldout and split_blocks > 0:  # a held-out stream too short for one block still gets a padded one
                split_blocks = max(split_blocks, chunks)
            n_samples = math.ceil(split_blocks / prep.blocks_per_sample)
            n_shards = math.ceil(n_samples / prep.samples_per_shard) + (chunks - 1 if n_samples else 0)
            total += n_samples * sample_bytes + n_shards * shard_end
        total += chunks * 4096  # the chunk records
    # Temperature sampling keeps the sentence total but moves sentences to the small languages, whose sentences may
    # be longer in tokens (another script, a smaller share of the vocabulary): a budgeted run gets a wider margin.
    return int(total * (1.25 if budget is not None else 1.1))


def checkpoint_bytes(parameters: int, world: int) -> int:
    """One DeepSpeed checkpoint: fp32 master weights and two Adam moments (12 B per parameter) over all ranks,
    the module's weights (at most 4 B), and a little per rank for RNG states and metadata."""
    return parameters * 16 + world * (64 << 10)


def pretrain_bytes(parameters: int, config: Any, world: int, done_tags: int = 0) -> int:
    """Estimated bytes pretraining writes: the checkpoints still to come that lie on disk at once (every one, or
    `pretrain.keep_checkpoints` + 1) and the exported model."""
    from .checkpoint import checkpoints_to_write

    p = config.pretrain
    saves = len({*range(p.save_every, p.steps + 1, p.save_every), p.steps})
    return (checkpoints_to_write(saves - done_tags, done_tags, p.keep_checkpoints) * checkpoint_bytes(parameters, world)
            + parameters * 4)


# --- models ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int  # embedding rows (config.json)
    tokenizer_size: int
    parameters: int


def model(path: Path, key: str, *, mask: bool = False) -> ModelFacts:
    """A model directory a stage will load on every rank: config, whole weights, a tokenizer that belongs to it.

    The tokenizer may have fewer tokens than the embedding has rows only by padding (a vocabulary rounded up to
    a multiple such as 64, at most 1 % or 256 rows); a tokenizer with far fewer tokens (a tokenizer built from
    a tokenizer_config.json alone has only its special tokens) would map every word to <unk> and still give
    numbers. Special-token ids must be rows of the embedding, and a pad id must be the model's."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise HyperofaError(f"{path}: not an HF model directory ({CONFIG} missing) ({key})")
    config = read_model_config(path)
    rows = config.get("vocab_size")
    if not isinstance(rows, int) or rows <= 0:
        raise HyperofaError(f"{path / CONFIG}: no vocab_size ({key})")
    parameters = weight_parameters(path)
    if not (path / TOKENIZER_JSON).is_file():
        raise HyperofaError(f"{path}: the model directory has no {TOKENIZER_JSON} (its tokenizer is needed) ({key})")
    tokenizer = load_tokenizer(path, key)
    size = len(tokenizer)
    tokenizer_fits(path, size, rows, key)
    specials = {tok: i for tok, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    outside = {tok: i for tok, i in specials.items() if i is None or not 0 <= i < rows}
    if outside:
        raise HyperofaError(f"{path}: special tokens {outside} have no embedding row (vocab_size {rows}) ({key})")
    pad = config.get("pad_token_id")
    if pad is not None and tokenizer.pad_token_id is not None and pad != tokenizer.pad_token_id:
        raise HyperofaError(
            f"{path}: the tokenizer's pad id is {tokenizer.pad_token_id}, the model's pad_token_id is {pad} ({key})"
        )
    if mask and tokenizer.mask_token_id is None:
        raise HyperofaError(f"{path}: the tokenizer has no mask token, which masked-LM training needs ({key})")
    return ModelFacts(rows, size, parameters)


def tokenizer_fits(path: Path, size: int, rows: int, key: str) -> None:
    """A tokenizer of `size` tokens belongs to a model of `rows` embedding rows: never more tokens than rows, and
    fewer only by padding (a vocabulary rounded up to a multiple such as 64: at most 1 % or 256 rows)."""
    if size > rows:
        raise HyperofaError(
            f"{path}: tokenizer has {size} tokens but the model's input embedding has {rows} rows; the tokenizer "
            f"does not belong to this model ({key})"
        )
    if rows - size > max(256, rows // 100):
        raise HyperofaError(
            f"{path}: tokenizer has {size} tokens but the model has {rows} embedding rows; the tokenizer does not "
            f"belong to this model ({key})"
        )


def source_rows_fit(tokens: int, rows: int, kind: str) -> bool:
    """The method's rule for a source model: a masked LM has one embedding row per token; a causal LM may have
    more rows than tokens (Qwen2 rounds its matrix up), rows that belong to no token."""
    from ..formats.models import CAUSAL

    return rows == tokens or (kind == CAUSAL and rows > tokens)


def source_vocabulary(config: Any, tokenizer: Any) -> None:
    """The source tokenizer belongs to the source model (`source_rows_fit`), read from a local model's
    config.json: checked by the tokenizer stage, before it builds a target tokenizer on a tokenizer the mapping
    would later refuse."""
    from ..formats.models import model_kind_of

    where = Path(config.source.model)
    if not (where / CONFIG).is_file():  # a hub name, or a tokenizer alone: mapping loads the model and checks it
        return
    rows = read_model_config(where).get("vocab_size")
    if isinstance(rows, int) and not source_rows_fit(len(tokenizer), rows, model_kind_of(where)):
        key = "source.tokenizer" if config.source.tokenizer else "source.model"
        raise HyperofaError(
            f"source tokenizer has {len(tokenizer)} tokens but the model {config.source.model} has {rows} embedding "
            f"rows; they must be the same ({key})"
        )


# --- shards ----------------------------------------------------------------------------------------------------


def shards(paths: Iterable[str | Path], prepare_dir: Optional[Path], *, verify: bool, block_size: Optional[int]) -> int:
    """Every shard is the file prepare wrote: the size its manifest records (when `prepare_dir` has one), tar
    and `.npy` headers that parse with the recorded block count and the expected block width, and with `verify`
    (run.verify_inputs) the recorded sha256. Returns the blocks found."""
    records: dict[str, dict[str, Any]] = {}
    listed: dict[str, dict[str, Any]] = {}
    if prepare_dir is not None and (prepare_dir / MANIFEST).is_file():
        from ..formats.files import read_json

        manifest = read_json(prepare_dir / MANIFEST, "prepare manifest")
        records = {r["path"]: r for r in manifest.get("outputs") or [] if isinstance(r, dict) and "path" in r}
        listed = {s["path"]: s for s in manifest.get("shards") or [] if isinstance(s, dict) and "path" in s}
    total = 0
    for path in paths:
        path = Path(path)
        relative = path.relative_to(prepare_dir).as_posix() if prepare_dir and path.is_relative_to(prepare_dir) else None
        record = records.get(relative or "")
        if record is not None and path.is_file() and path.stat().st_size != record.get("bytes"):
            raise HyperofaError(
                f"{path}: shard has {path.stat().st_size} bytes, the prepare manifest records {record.get('bytes')}; "
                "re-run `hyperofa prepare`"
            )
        index = index_shard(path)
        expected = (listed.get(relative or "") or {}).get("blocks")
        if expected is not None and int(expected) != index.blocks:
            raise HyperofaError(
                f"{path}: shard holds {index.blocks} blocks, the prepare manifest records {expected}; re-run "
                "`hyperofa prepare`"
            )
        if block_size is not None and index.width is not None and index.width != block_size:
            raise HyperofaError(f"{path}: blocks of {index.width} tokens, expected {block_size}")
        if verify:
            if record is None or "sha256" not in record:
                raise HyperofaError(
                    f"{path}: no sha256 recorded for this shard in a prepare manifest, so it cannot be verified "
                    "(run.verify_inputs=true)"
                )
            if sha256_file(path) != record["sha256"]:
                raise HyperofaError(
                    f"{path}: shard content differs from what prepare wrote (sha256 mismatch); re-run `hyperofa prepare`"
                )
        total += index.blocks
    return total


# --- corpora ---------------------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Lines of a text file (`.gz` read through gzip), ended as formats/text.py says; a last line without an end
    counts."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            lines, _ = count_line_ends(iter(lambda: handle.read(1 << 20), b""))
    except (OSError, EOFError) as exc:
        raise HyperofaError(f"{path}: cannot read ({exc})") from None
    return lines


def parallel_corpus(files: Sequence[tuple[str, Path]], prefix_aligned: bool) -> dict[str, int]:
    """Line i of every file must be translations, so every file has the same number of lines (unless
    `vectors.train.prefix_aligned` says shorter files are translations of the first lines). Returns the counts."""
    counts = {path.name: count_lines(path) for _, path in files}
    if not prefix_aligned and len(set(counts.values())) > 1:
        short = min(counts, key=lambda n: (counts[n], n))
        long = max(counts, key=lambda n: (counts[n], n))
        directory = files[0][1].parent
        raise HyperofaError(
            f"{directory}: parallel corpus is misaligned: {short} has {counts[short]} lines, {long} has "
            f"{counts[long]} (line i of every file must be translations; set vectors.train.prefix_aligned=true if "
            "shorter files translate the first lines of the longer ones)"
        )
    return counts


def noise_share(text: str) -> tuple[float, int]:
    """(share of non-whitespace characters that are not letters or combining marks, characters counted).

    Invalid UTF-8 (U+FFFD after decoding), control bytes, symbols, digits and punctuation all count as noise;
    real text in any script is mostly letters and marks (the generated worlds' 16 scripts: 1.5-3 %), random
    bytes are about 75 % noise."""
    noise = counted = 0
    for char, n in collections.Counter(text).items():
        if char.isspace():
            continue
        counted += n
        if unicodedata.category(char)[0] not in "LM":
            noise += n
    return (noise / counted if counted else 0.0), counted


MIN_JUDGED_CHARS = 64  # a file with less text than this is too small to call garbage


def corpus_text(sources: Iterable[LanguageSource], max_share: float) -> dict[str, list[TextSample]]:
    """A sample of every file of every language (hub languages are not sampled); refuses a file whose sample is
    more than `max_share` noise (`corpus.max_noise_share`). Returns the samples, for estimates."""
    samples: dict[str, list[TextSample]] = {}
    for source in sources:
        for path in source.files:
            sample = sample_text(path, column=source.text_column)
            samples.setdefault(source.lang, []).append(sample)
            share, counted = noise_share(sample.text)
            if max_share < 1.0 and counted >= MIN_JUDGED_CHARS and share > max_share:
                raise HyperofaError(
                    f"{path}: {share:.0%} of the sampled text of {source.lang} is invalid UTF-8 or not letters "
                    f"(limit corpus.max_noise_share={max_share:g}); a binary or non-text file? fix or remove it, or "
                    "raise corpus.max_noise_share"
                )
    return samples
