"""HF model directories (the source model, every expanded and pretrained model): the one loader and writer.

A model directory is what `save_pretrained` writes for the model and its tokenizer together; stock
`AutoModelFor*.from_pretrained` and `AutoTokenizer.from_pretrained` load it with no custom code. The source model
may also be an HF hub name (resolved by transformers; nothing is fetched when the hub is offline).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import HyperofaError
from .files import fingerprint_dir, sha256_file, tmp_name
from .tokenizer import TOKENIZER_JSON, tokenizer_fingerprint

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
MODEL_FILES = (CONFIG, *WEIGHT_FILES)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading an MLM checkpoint into AutoModel/…ForTokenClassification prints expected key reports; hide them."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def load_model(name: str | Path, auto_class: str = "AutoModelForMaskedLM", key: str = "", **kwargs: Any) -> Any:
    """`transformers.<auto_class>.from_pretrained(name)`, in eval mode, with a one-line error naming `key`."""
    return _from_pretrained(name, auto_class, key, **kwargs)[0]


def load_model_reporting_missing(
    name: str | Path, auto_class: str = "AutoModelForMaskedLM", key: str = "", **kwargs: Any
) -> tuple[Any, list[str]]:
    """`load_model`, plus the sorted names of the weights the checkpoint lacked: transformers fills those with
    its own unseeded random init, which a caller that needs them must replace (`init.head`)."""
    return _from_pretrained(name, auto_class, key, output_loading_info=True, **kwargs)


def _from_pretrained(name: str | Path, auto_class: str, key: str, **kwargs: Any) -> tuple[Any, list[str]]:
    import transformers

    cls = getattr(transformers, auto_class)
    where = f" ({key})" if key else ""
    try:
        with quiet_transformers():
            loaded = cls.from_pretrained(str(name), **kwargs)
    except Exception as exc:  # hub, network and checkpoint-format errors of many types
        raise HyperofaError(
            f"{name}: cannot load the model{where} ({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from None
    if kwargs.get("output_loading_info"):
        model, info = loaded
        return model.eval(), sorted(info.get("missing_keys") or ())
    return loaded.eval(), []


@dataclass
class Source:
    """The source model as the stages read it: masked LM, fast tokenizer, and the weights its checkpoint lacked
    (a sentence-embedding model has no MLM head: its head weights are listed here)."""

    model: Any
    tokenizer: Any
    missing: list[str] = field(default_factory=list)


def load_source(config: Any) -> Source:
    """The source model (`source.model`; the tokenizer from `source.tokenizer` when set): the one loader of the
    stages that read the source (mapping, init)."""
    from .tokenizer import source_tokenizer

    model, missing = load_model_reporting_missing(config.source.model, key="source.model")
    return Source(model, source_tokenizer(config), missing)


def require_model_dir(path: Path, *, tokenizer: bool = True) -> Path:
    """An HF model directory with its config (and, when asked, its tokenizer)."""
    if not (path / CONFIG).is_file():
        raise HyperofaError(f"{path}: not an HF model directory ({CONFIG} missing)")
    if tokenizer and not (path / TOKENIZER_JSON).is_file():
        raise HyperofaError(f"{path}: the model directory has no {TOKENIZER_JSON} (its tokenizer is needed)")
    return path


SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_parameters(path: Path) -> int:
    """The parameter count of a model directory's weights, after checking they are there and whole: every
    safetensors file's header parses and its tensors end exactly at the end of the file (a truncated copy does
    not), every shard an index names exists; a `pytorch_model.bin` opens as a zip archive. Reads headers only."""
    from .files import read_json

    if (path / "model.safetensors").is_file():
        return _safetensors_parameters(path / "model.safetensors")
    if (path / SAFETENSORS_INDEX).is_file():
        index = read_json(path / SAFETENSORS_INDEX, "safetensors index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise HyperofaError(f"{path / SAFETENSORS_INDEX}: names no weight files")
        return sum(_safetensors_parameters(path / name) for name in shards)
    if (path / "pytorch_model.bin").is_file():
        import zipfile

        bin_path = path / "pytorch_model.bin"
        try:
            with zipfile.ZipFile(bin_path) as archive:
                archive.namelist()
        except zipfile.BadZipFile:
            pass  # torch's legacy (pre-1.6) pickle format is not a zip archive; transformers checks it on load
        except Exception as exc:
            raise HyperofaError(f"{bin_path}: weights are truncated or damaged ({exc.__class__.__name__})") from None
        return bin_path.stat().st_size // 4
    raise HyperofaError(f"{path}: the model directory has no weights (none of {', '.join(WEIGHT_FILES)})")


def _safetensors_parameters(path: Path) -> int:
    import json
    import math

    if not path.is_file():
        raise HyperofaError(f"{path}: weight file not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or not 0 < length <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(handle.read(length))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
        count = sum(math.prod(t["shape"]) for t in tensors)
    except Exception as exc:  # a damaged header: wrong length, not JSON, missing fields
        raise HyperofaError(f"{path}: weights are damaged (no valid safetensors header: {exc})") from None
    if 8 + length + end != size:
        raise HyperofaError(
            f"{path}: weights are truncated or damaged (the file has {size} bytes, its header describes "
            f"{8 + length + end})"
        )
    return count


def read_model_config(path: Path) -> dict[str, Any]:
    from .files import read_json

    return read_json(path / CONFIG, "model config")


def read_word_embeddings(path: Path, rows: Any) -> Any:
    """Rows of a model directory's input word-embedding matrix as float64, read without loading the model (only
    those rows from a safetensors file; a pickled `pytorch_model.bin` is memory-mapped)."""
    import numpy as np

    suffix = "word_embeddings.weight"
    safetensors = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the file holding the tensor
        from .files import read_json

        found = [f for k, f in (read_json(index, "weights index").get("weight_map") or {}).items() if k.endswith(suffix)]
        safetensors = path / found[0] if len(found) == 1 else safetensors
    if safetensors.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors), framework="pt") as handle:
            keys = [k for k in handle.keys() if k.endswith(suffix)]
            if len(keys) == 1:
                table = handle.get_slice(keys[0])
                return np.stack([table[int(r) : int(r) + 1].float().numpy()[0] for r in rows]).astype(np.float64)
    elif (path / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(path / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
        keys = [k for k in state if k.endswith(suffix)]
        if len(keys) == 1:
            return state[keys[0]][torch.as_tensor(rows)].double().numpy()
    else:
        keys = []
    raise HyperofaError(f"{path}: cannot find one `*{suffix}` tensor in the model weights (found {keys[:3]})")


def model_fingerprint(path: Path) -> dict[str, Any]:
    """sha256 of the model's config and weights and of its tokenizer files: the identity of a model directory."""
    return {
        "model": {n: sha256_file(path / n) for n in MODEL_FILES if (path / n).is_file()},
        "tokenizer": tokenizer_fingerprint(path),
    }


def source_identity(config: Any) -> dict[str, Any]:
    """The source model's identity for manifests: its name and, when local, the hashes of its files."""
    out: dict[str, Any] = {"model": config.source.model, "tokenizer": config.source.tokenizer}
    for key, where in (("model_files", config.source.model), ("tokenizer_files", config.source.tokenizer)):
        if where and Path(where).is_dir():
            out[key] = fingerprint_dir(where, MODEL_FILES if key == "model_files" else None)
    return out


def model_identity(where: str) -> dict[str, Any]:
    """A model's identity for manifests: its name and, when it is a local directory, the hashes of its files."""
    out: dict[str, Any] = {"model": where}
    if Path(where).is_dir():
        out["model_files"] = fingerprint_dir(where, MODEL_FILES)
    return out


def save_model_dir(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """save_pretrained of the model and its tokenizer into one directory (written to a sibling, then renamed)."""
    out_dir = Path(out_dir)
    tmp = tmp_name(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def model_files(out_dir: Path) -> list[str]:
    """The files of a saved model directory, relative to its parent (for a stage manifest)."""
    return sorted(f"{out_dir.name}/{p.name}" for p in out_dir.iterdir() if p.is_file())
