"""The prepare shards: packed token blocks in deterministic webdataset tar files, written and read here only.

Layout under a prepare directory (`<run.dir>/prepare/`):

    train/<lang>/<lang>-<chunk:05d>-<index:06d>.tar     training shards
    heldout/<lang>/<lang>-<chunk:05d>-<index:06d>.tar   held-out shards, same format
    manifest.json                                       lists every shard (split, lang, chunk, blocks)

A sample holds up to `blocks_per_sample` blocks as one `<key>.input_ids.npy` (uint32 `[n, block_size]`) plus
`<key>.lang.txt`, so no tar member is tiny. A held-out block may end in padding (its last id is the tokenizer's pad
id; the prepare manifest's `special_tokens.pad`): consumers give padding attention 0 and never predict it.
Every header field that could vary between runs or machines (mtime, uid/gid, owner names, mode) is fixed:
identical blocks give byte-identical shards, which is what lets a retried or re-run task rewrite identical bytes.
`webdataset.WebDataset(urls).decode()` reads them; the system itself reads them with `read_shard`, which checks
every sample and turns a truncated or foreign file into one line.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from .corpus import TextSample
from .files import atomic_write_bytes, npy_bytes, read_json, sha256_file
from .rundir import MANIFEST, Stage
from .text import split_lines
from .tokenizer import TOKENIZER_JSON

STAGE = "prepare"
SPLITS = ("train", "heldout")
IDS_MEMBER = "input_ids.npy"
LANG_MEMBER = "lang.txt"


# --- writing -----------------------------------------------------------------------------------------------


def shard_name(lang: str, chunk: int, index: int) -> str:
    """A shard's path relative to its split directory."""
    return f"{lang}/{lang}-{chunk:05d}-{index:06d}.tar"


SHARD_FILE = re.compile(r"^(?P<lang>.+)-\d{5}-\d{6}\.tar$")  # the file name shard_name gives


def sample_key(lang: str, chunk: int, sample: int) -> str:
    # webdataset splits a member name at its first dot, so keys must not contain one.
    return f"{lang}-{chunk:05d}-{sample:08d}"


BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
# A member header's fixed fields (mode 0o444, uid 0, gid 0; then mtime 0, and the ustar magic and version): every
# field a run or machine could vary is fixed, so identical blocks give byte-identical shards.
_MODE_UID_GID = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_MAGIC = b"ustar\x0000"


_TAIL = b"0" + bytes(100) + _MAGIC + bytes(BLOCK - 265)  # type (regular file), no link name, magic, empty rest
# The header checksum is the byte sum of the header with its own field as spaces: the fixed part summed once.
_FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + 8 * ord(" ") + sum(_TAIL)


def _member_header(name: bytes, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file with the fixed fields above."""
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME, b"%06o\0 " % checksum, _TAIL))


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A USTAR archive of (name, data) members with every run-dependent header field fixed.

    The headers are written here directly (tarfile's member machinery was a tenth of prepare's time); the bytes
    are exactly tarfile's (a test compares them), and a name tarfile would have to split into prefix and name
    (over 100 bytes) or that is not ASCII goes through tarfile itself."""
    if not all(name.isascii() and 0 < len(name) <= 100 for name, _ in members):
        return _tarfile_bytes(members)
    parts: list[bytes] = []
    size = 0
    for name, data in members:
        parts.append(_member_header(name.encode("ascii"), len(data)))
        parts.append(data)
        padding = -len(data) % BLOCK
        if padding:
            parts.append(bytes(padding))
        size += BLOCK + len(data) + padding
    size += 2 * BLOCK  # the end-of-archive marker: two zero blocks
    parts.append(bytes(2 * BLOCK + (-size % RECORD)))
    return b"".join(parts)


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the split directory
    index: int
    blocks: int
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def build_shards(
    blocks: np.ndarray, lang: str, chunk: int, blocks_per_sample: int, samples_per_shard: int
) -> Iterator[Shard]:
    """The shards of one (language, chunk), in order; no shard at all when there is no block."""
    blocks_per_shard = blocks_per_sample * samples_per_shard
    lang_bytes = lang.encode("utf-8")
    for index, first in enumerate(range(0, blocks.shape[0], blocks_per_shard)):
        members = []
        stop = min(first + blocks_per_shard, blocks.shape[0])
        for start in range(first, stop, blocks_per_sample):
            key = sample_key(lang, chunk, start // blocks_per_sample)
            members.append((f"{key}.{IDS_MEMBER}", npy_bytes(blocks[start : min(start + blocks_per_sample, stop)])))
            members.append((f"{key}.{LANG_MEMBER}", lang_bytes))
        yield Shard(shard_name(lang, chunk, index), index, stop - first, tar_bytes(members))


def write_shard(path: Path, data: bytes, keep_existing: bool, durable: bool = True) -> bool:
    """Write under a temporary name, then rename; with keep_existing a file of the right size is left alone.
    With `durable=False` the caller makes it durable later (`formats.files.sync_files`).

    Returns whether the file was (re)written.
    """
    if keep_existing and path.is_file() and path.stat().st_size == len(data):
        return False
    atomic_write_bytes(path, data, durable=durable)
    return True


# --- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    key: str
    lang: str
    blocks: np.ndarray  # uint32 [n, block_size]


def read_shard(path: str | Path) -> Iterator[Sample]:
    """The samples of one shard in file order, each checked: both members present, a 2-D unsigned id array."""
    path = Path(path)
    try:
        with tarfile.open(path, "r|") as tar:  # streaming: members in order, nothing kept but the current sample
            current: Optional[str] = None
            parts: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current is not None and key != current:
                    yield _sample(path, current, parts)
                    parts = {}
                current = key
                parts[ext] = tar.extractfile(member).read()
            if current is not None:
                yield _sample(path, current, parts)
            # The stream ends quietly at a cut between members; a whole shard ends with two zero blocks.
            if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise HyperofaError(
                    f"{path}: shard is truncated (it ends without the tar end-of-archive blocks); re-run `hyperofa "
                    "prepare`"
                )
    except FileNotFoundError:
        raise HyperofaError(f"{path}: shard not found; re-run `hyperofa prepare`") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise HyperofaError(
            f"{path}: shard is truncated or not a tar archive ({exc.__class__.__name__}); re-run `hyperofa prepare`"
        ) from None


def _sample(path: Path, key: str, parts: dict[str, bytes]) -> Sample:
    if IDS_MEMBER not in parts or LANG_MEMBER not in parts:
        raise HyperofaError(f"{path}: sample {key} lacks {IDS_MEMBER} or {LANG_MEMBER}")
    try:
        array = np.load(io.BytesIO(parts[IDS_MEMBER]), allow_pickle=False)
        lang = parts[LANG_MEMBER].decode("utf-8").strip()
    except Exception:  # a damaged .npy header raises ValueError, SyntaxError, TokenError, ...; a damaged lang bytes
        raise HyperofaError(f"{path}: sample {key} is damaged; re-run `hyperofa prepare`") from None
    if array.ndim != 2 or array.dtype.kind not in "ui":
        raise HyperofaError(f"{path}: sample {key}: input_ids must be an integer [n, block_size] array, got {array.shape}")
    return Sample(key, lang, array)


@dataclass(frozen=True)
class ShardIndex:
    """What the headers of a shard say: its samples, blocks and block width (None when it has no block)."""

    samples: int
    blocks: int
    width: Optional[int]


def index_shard(path: str | Path) -> ShardIndex:
    """Parse a shard's index without reading its data: every tar header (checksum, and data inside the file), the
    end-of-archive blocks, both members of every sample, and each id array's `.npy` header (an integer
    [n, width] array whose size is the member's). Cheap: two small reads per sample."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            return _index(path, handle, size)
    except FileNotFoundError:
        raise HyperofaError(f"{path}: shard not found; re-run `hyperofa prepare`") from None
    except OSError as exc:
        raise HyperofaError(f"{path}: cannot read the shard ({exc.strerror or exc.__class__.__name__})") from None


def _index(path: Path, handle: Any, size: int) -> ShardIndex:
    def broken(why: str) -> HyperofaError:
        return HyperofaError(f"{path}: shard is truncated or damaged ({why}); re-run `hyperofa prepare`")

    offset, members = 0, {}
    zero = bytes(tarfile.BLOCKSIZE)
    while True:
        handle.seek(offset)
        header = handle.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise broken(f"no end-of-archive blocks after {len(members)} members")
        if header == zero:
            if handle.read(tarfile.BLOCKSIZE) != zero:
                raise broken("a single end-of-archive block")
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise broken(f"bad tar header at byte {offset}: {exc}") from None
        data = offset + tarfile.BLOCKSIZE
        if data + info.size > size:
            raise broken(f"member {info.name} needs {data + info.size} bytes, the file has {size}")
        if info.isfile():
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = (data, info.size)
        offset = data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    blocks, width = 0, None
    for key, parts in members.items():
        if IDS_MEMBER not in parts or LANG_MEMBER not in parts:
            raise HyperofaError(f"{path}: sample {key} lacks {IDS_MEMBER} or {LANG_MEMBER}")
        start, length = parts[IDS_MEMBER]
        handle.seek(start)
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
        except Exception as exc:  # numpy reports a damaged header as ValueError, SyntaxError, TokenError, ...
            raise broken(f"sample {key}: {IDS_MEMBER} has no valid .npy header ({exc.__class__.__name__})") from None
        if len(shape) != 2 or dtype.kind not in "ui":
            raise broken(f"sample {key}: input_ids is {dtype}{list(shape)}, not an integer [n, block_size] array")
        if handle.tell() - start + shape[0] * shape[1] * dtype.itemsize != length:
            raise broken(f"sample {key}: {IDS_MEMBER} holds {length} bytes, its header describes another size")
        if width is not None and shape[1] != width:
            raise broken(f"sample {key}: block size {shape[1]} differs from {width}")
        blocks, width = blocks + shape[0], shape[1]
    return ShardIndex(len(members), blocks, width)


def first_blocks(
    shards: Sequence[str | Path], max_blocks: Optional[int] = None, languages: Optional[Iterable[str]] = None
) -> dict[str, np.ndarray]:
    """language -> its first `max_blocks` blocks (uint32 [n, block_size]) in shard order; one block width for all."""
    found: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    wanted = set(languages) if languages is not None else None
    width: Optional[int] = None
    for shard in shards:
        for sample in read_shard(shard):
            if wanted is not None and sample.lang not in wanted:
                continue
            have = counts.get(sample.lang, 0)
            if max_blocks is not None and have >= max_blocks:
                continue
            array = sample.blocks
            if width is not None and array.shape[1] != width:
                raise HyperofaError(f"{shard}: sample {sample.key}: block size {array.shape[1]} differs from {width}")
            width = array.shape[1]
            if max_blocks is not None:
                array = array[: max_blocks - have]
            found.setdefault(sample.lang, []).append(array)
            counts[sample.lang] = have + array.shape[0]
    return {lang: np.concatenate(parts) for lang, parts in sorted(found.items())}


# --- prepare's hand-off: its manifest, read once ---------------------------------------------------------------

TOKENIZER_KEY = ("inputs", "tokenizer", TOKENIZER_JSON)  # the sha256 of the tokenizer prepare tokenized with
FRAME_ROLES = ("cls", "sep", "pad")  # special_tokens: the ids the blocks are framed with (pad may be null)


@dataclass(frozen=True)
class ShardSet:
    """What a prepare directory hands to the stages that read its shards: shard paths per split and language
    (absolute, sorted), the training blocks per language, and from its manifest the block size, the sha256 of the
    tokenizer that made the ids, the ids that frame the blocks and the inputs digest. A job rebuilds one from its
    job file with the shard lists only."""

    train: dict[str, list[str]]
    heldout: dict[str, list[str]]
    blocks: dict[str, int] = field(default_factory=dict)
    block_size: Optional[int] = None
    tokenizer_sha256: Optional[str] = None
    special_tokens: dict[str, Optional[int]] = field(default_factory=dict)
    inputs_digest: Optional[str] = None
    manifest_path: Optional[Path] = None

    def require_tokenizer(self, tokenizer_sha256: str, whose: str, remedy: str) -> None:
        """The shards are token ids of the tokenizer whose `tokenizer.json` has this sha256, else one line naming
        the manifest and its key (a record missing or of another tokenizer)."""
        key = ".".join(TOKENIZER_KEY)
        if self.tokenizer_sha256 is None:
            raise HyperofaError(f"{self.manifest_path}: key '{key}' is missing (the tokenizer that made the shards); "
                                "re-run `hyperofa prepare`")
        if self.tokenizer_sha256 != tokenizer_sha256:
            raise HyperofaError(
                f"{self.manifest_path}: key '{key}': the shards were made with another tokenizer than {whose} "
                f"(sha256 {self.tokenizer_sha256[:12]} recorded != {tokenizer_sha256[:12]}); {remedy}"
            )


def prepare_dir(run_dir: str | Path) -> Path:
    """Where the prepare stage of a run directory writes its shards."""
    return Path(run_dir) / STAGE


def load_shardset(prepare_dir: str | Path, check_files: bool = True) -> ShardSet:
    """The shards a finished prepare stage lists in its manifest (absolute paths), with what the manifest says
    about them. A key missing or of the wrong type is one line naming the manifest and the key; with
    `check_files`, so is a listed shard that is missing."""
    prepare_dir = Path(prepare_dir).resolve()
    stage = Stage(prepare_dir.parent, prepare_dir.name)
    return _shardset(stage.require(), stage.manifest_path, check_files)


def find_shardset(prepare_dir: str | Path, check_files: bool = False) -> Optional[ShardSet]:
    """`load_shardset` of a directory with a prepare manifest; None for one without (a bare directory of shards,
    or prepare has not run)."""
    prepare_dir = Path(prepare_dir).resolve()
    if not (prepare_dir / MANIFEST).is_file():
        return None
    return load_shardset(prepare_dir, check_files)


def _shardset(manifest: Any, where: Path, check_files: bool) -> ShardSet:
    def bad(key: str, want: str) -> HyperofaError:
        return HyperofaError(f"{where}: key '{key}' is missing or not {want}; re-run `hyperofa prepare`")

    if not isinstance(manifest, dict):
        raise bad("(top level)", "an object")
    listed = manifest.get("shards")
    if not isinstance(listed, list):
        raise bad("shards", "a list")
    sets: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    blocks: dict[str, int] = {}
    for i, shard in enumerate(listed):
        if not (isinstance(shard, dict) and isinstance(shard.get("path"), str) and isinstance(shard.get("lang"), str)
                and isinstance(shard.get("blocks", 0), int)):
            raise bad(f"shards[{i}]", "an object with a path, a lang and a block count")
    for shard in sorted(listed, key=lambda s: s["path"]):
        split = shard.get("split")
        if split not in sets:
            continue
        path = where.parent / shard["path"]
        if check_files and not path.is_file():
            raise HyperofaError(f"{path}: shard listed in the prepare manifest is missing; re-run `hyperofa prepare`")
        sets[split].setdefault(shard["lang"], []).append(str(path))
        if split == "train":
            blocks[shard["lang"]] = blocks.get(shard["lang"], 0) + int(shard.get("blocks", 0))
    inputs = manifest.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get(TOKENIZER_KEY[1], {}), dict):
        raise bad(".".join(TOKENIZER_KEY[:2]), "an object")
    tokenizer = inputs.get(TOKENIZER_KEY[1], {}).get(TOKENIZER_KEY[2])
    if not isinstance(tokenizer, (str, type(None))):
        raise bad(".".join(TOKENIZER_KEY), "a sha256")
    special = manifest.get("special_tokens", {})  # unrecorded: the frame is the tokenizer's (pretrain/causal.py)
    if not (isinstance(special, dict) and all(isinstance(special.get(r), (int, type(None))) for r in FRAME_ROLES)):
        raise bad("special_tokens", "token ids")
    block_size = manifest.get("block_size")
    if not isinstance(block_size, int) or block_size < 1:
        raise bad("block_size", "a positive integer")
    digest = manifest.get("inputs_digest")
    if not isinstance(digest, str):
        raise bad("inputs_digest", "a digest")
    return ShardSet(sets["train"], sets["heldout"], blocks, block_size, tokenizer,
                    {role: special[role] for role in FRAME_ROLES if role in special}, digest, where)


def heldout_shards(path: str | Path) -> list[Path]:
    """Held-out shards of a prepare directory (from its manifest when it lists them), or every tar under a
    directory of shards (`<dir>/heldout/**` when present)."""
    path = Path(path)
    if not path.is_dir():
        raise HyperofaError(
            f"{path}: held-out shard directory not found (run `hyperofa prepare` or set evaluate.heldout_dir)"
        )
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        listed = read_json(manifest_path, "prepare manifest").get("shards")
        if isinstance(listed, list):
            shards = [path / s["path"] for s in listed if s.get("split") == "heldout"]
            missing = [p for p in shards if not p.is_file()]
            if missing:
                raise HyperofaError(f"{missing[0]}: held-out shard listed in the prepare manifest is missing")
            if not shards:
                raise HyperofaError(f"{manifest_path}: no held-out shards (prepare.heldout_fraction is 0?)")
            return sorted(shards)
    root = path / "heldout" if (path / "heldout").is_dir() else path
    shards = sorted(root.rglob("*.tar"))
    if not shards:
        raise HyperofaError(f"{root}: no .tar shards found")
    return shards


def shards_by_language(shards: Sequence[str | Path]) -> dict[str, list[Path]]:
    """The shards of each language, from the file names `shard_name` gives (a shard named otherwise: from the
    language of its first sample)."""
    out: dict[str, list[Path]] = {}
    for shard in shards:
        shard = Path(shard)
        match = SHARD_FILE.match(shard.name)
        lang = match["lang"] if match else next((sample.lang for sample in read_shard(shard)), None)
        if lang is not None:
            out.setdefault(lang, []).append(shard)
    return out


# --- preflight: shards read back, and the bytes prepare will write ------------------------------------------


def check_shards(paths: Iterable[str | Path], prepare_dir: Optional[Path], *, verify: bool, block_size: Optional[int]) -> int:
    """Every shard is the file prepare wrote: the size its manifest records (when `prepare_dir` has one), tar
    and `.npy` headers that parse with the recorded block count and the expected block width, and with `verify`
    (run.verify_inputs) the recorded sha256. Returns the blocks found."""
    records: dict[str, dict[str, Any]] = {}
    listed: dict[str, dict[str, Any]] = {}
    if prepare_dir is not None and (prepare_dir / MANIFEST).is_file():
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
