"""HF model directories (the source model, every expanded and pretrained model): the one loader and writer.

A model directory is what `save_pretrained` writes for the model and its tokenizer together; stock
`AutoModelFor*.from_pretrained` and `AutoTokenizer.from_pretrained` load it with no custom code. The source model
may also be an HF hub name (resolved by transformers; nothing is fetched when the hub is offline).

Two kinds of model, told apart from the model's own config (`model_kind`), here and nowhere else: masked LMs
(XLM-R, RoBERTa, BERT; encoders published without a head count as masked) and causal LMs (Llama, Mistral, Qwen2,
Gemma: any `AutoModelForCausalLM` whose word embedding is an `nn.Embedding`, with the output projection tied to it
or a matrix of its own). `load_source` loads each with its auto class and refuses, in one line, a model whose
vocabulary rows an expansion could not replace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import HyperofaError
from .files import fingerprint_dir, sha256_file, tmp_name
from .tokenizer import TOKENIZER_JSON, load_tokenizer, save_tokenizer, tokenizer_fingerprint

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


MASKED, CAUSAL = "masked", "causal"
AUTO_CLASS = {MASKED: "AutoModelForMaskedLM", CAUSAL: "AutoModelForCausalLM"}
# What an auto class is for, when only an encoder masked LM can serve it (a causal LM would load into some of them,
# e.g. LlamaForTokenClassification, and silently give numbers of another protocol).
MASKED_ONLY = {"AutoModelForMaskedLM": "masked-LM use", "AutoModelForTokenClassification": "tagging (POS/NER)"}


def model_kind(model_config: Any, where: str | Path = "model") -> str:
    """MASKED or CAUSAL, from an HF config (object or `config.json` dict): its architectures name the head
    (`…ForCausalLM`, `…LMHeadModel`, `…ForMaskedLM`); a headless checkpoint (`XLMRobertaModel`) is decided by its
    model type, an encoder type (with a masked-LM class) counting as masked."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    get = model_config.get if isinstance(model_config, dict) else lambda key: getattr(model_config, key, None)
    architectures = get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return CAUSAL
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return MASKED
    model_type = get("model_type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return MASKED
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL
    raise HyperofaError(
        f"{where}: model_type {model_type!r} (architectures {architectures}) is neither a masked LM nor a causal LM"
    )


def load_model(name: str | Path, auto_class: str = "AutoModelForMaskedLM", key: str = "", **kwargs: Any) -> Any:
    """`transformers.<auto_class>.from_pretrained(name)`, in eval mode, with a one-line error naming `key`.

    A causal LM asked for with an auto class only a masked LM can serve (MASKED_ONLY) is refused in one line."""
    _refuse_causal_for(name, auto_class, key)
    return _from_pretrained(name, auto_class, key, **kwargs)[0]


def _refuse_causal_for(name: str | Path, auto_class: str, key: str) -> None:
    use = MASKED_ONLY.get(auto_class)
    path = Path(str(name)).expanduser() / CONFIG
    if use is None or not path.is_file():
        return  # a hub name is checked by the auto class itself
    if model_kind(read_model_config(path.parent), path.parent) == CAUSAL:
        where = f" ({key})" if key else ""
        raise HyperofaError(f"{path.parent}: is a causal LM{where}; {use} needs a masked LM (XLM-R, RoBERTa, BERT)")


def model_kind_of(path: str | Path) -> str:
    """The kind of the model in an HF model directory, read from its config.json (nothing loaded)."""
    return model_kind(read_model_config(Path(path)), path)


def load_model_reporting_missing(
    name: str | Path, auto_class: str = "AutoModelForMaskedLM", key: str = "", **kwargs: Any
) -> tuple[Any, list[str]]:
    """`load_model`, plus the sorted names of the weights the checkpoint lacked: transformers fills those with
    its own unseeded random init, which a caller that needs them must replace (`models.head`)."""
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
    """The source model as the stages read it: masked or causal LM, fast tokenizer, and the weights its checkpoint
    lacked (a sentence-embedding model has no MLM head: its head weights are listed here)."""

    model: Any
    tokenizer: Any
    missing: list[str] = field(default_factory=list)
    kind: str = MASKED

    @property
    def untied(self) -> bool:
        """A causal LM whose output projection is a matrix of its own (Llama, Mistral): both are initialised."""
        return self.kind == CAUSAL and not tied_output(self.model)

    def input_embeddings(self) -> Any:
        """E_s as float32 numpy [rows, D] (a copy)."""
        return self.model.get_input_embeddings().weight.detach().float().numpy().copy()

    def output_embeddings(self) -> Any:
        """The untied output projection's rows as float32 numpy [rows, D] (a copy)."""
        return self.model.get_output_embeddings().weight.detach().float().numpy().copy()


def tied_output(model: Any) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def load_source(config: Any) -> Source:
    """The source model (`source.model`; the tokenizer from `source.tokenizer` when set): the one loader of the
    stages that read the source (mapping, init). Its kind is read from its config first, so each kind loads with
    its own auto class; a model whose vocabulary rows cannot be replaced is refused in one line."""
    from .tokenizer import source_tokenizer

    name = config.source.model
    kind = model_kind(_load_config(name, "source.model"), name)
    model, missing = load_model_reporting_missing(name, AUTO_CLASS[kind], key="source.model")
    require_resizable(model, kind, name)
    return Source(model, source_tokenizer(config), missing, kind)


def _load_config(name: str | Path, key: str) -> Any:
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(name))
    except Exception as exc:  # hub, network and format errors of many types
        raise HyperofaError(f"{name}: cannot load the model config ({key}) ({exc.__class__.__name__}: "
                            f"{str(exc)[:200]})") from None


def require_resizable(model: Any, kind: str, where: str | Path) -> None:
    """The expansion replaces the word embedding (and an untied output projection) by larger matrices: they must be
    a plain `nn.Embedding` and `nn.Linear`, and no other weight may have a row per token (Gemma 3n's per-layer
    token tables, for instance, would keep the source vocabulary)."""
    import torch

    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:
        embedding = None
    if not isinstance(embedding, torch.nn.Embedding):
        raise HyperofaError(
            f"{where}: the model has no resizable word embedding (get_input_embeddings gives "
            f"{type(embedding).__name__}, not an nn.Embedding); its vocabulary cannot be expanded"
        )
    if kind != CAUSAL:
        return
    rows = embedding.weight.shape[0]
    output = model.get_output_embeddings()
    if not isinstance(output, torch.nn.Linear) or tuple(output.weight.shape) != tuple(embedding.weight.shape):
        raise HyperofaError(
            f"{where}: the causal LM's output projection is {type(output).__name__}"
            f"{'' if output is None else ' ' + str(tuple(output.weight.shape))}, not an nn.Linear of the word "
            f"embedding's shape {tuple(embedding.weight.shape)}; its vocabulary cannot be expanded"
        )
    known = {id(embedding.weight), id(output.weight)} | ({id(output.bias)} if output.bias is not None else set())
    others = [name for name, p in model.named_parameters() if id(p) not in known and rows in tuple(p.shape)]
    if others:
        raise HyperofaError(
            f"{where}: weights other than the word embedding and the output projection have a row per token "
            f"({', '.join(others[:3])}); the expansion cannot resize them"
        )


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


def read_word_embeddings(path: Path, rows: Any, suffix: str) -> Any:
    """Rows of a model directory's input word-embedding matrix (the one tensor whose name ends in `suffix`, as its
    model family names it) as float64, read without loading the model (only those rows from a safetensors file; a
    pickled `pytorch_model.bin` is memory-mapped)."""
    import numpy as np

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
    """The source model's identity for manifests: `model_identity` of source.model and, when set, of
    source.tokenizer (all of its directory's files)."""
    out = model_identity(config.source.model)
    if config.source.tokenizer:
        out["tokenizer"] = model_identity(config.source.tokenizer, None)
    return out


def model_identity(where: str, names: Optional[Iterable[str]] = MODEL_FILES) -> dict[str, Any]:
    """A model's identity for manifests: the hashes of its files when it is a local directory (not its path, so the
    same model elsewhere or spelled otherwise is the same input), its hub name otherwise. `names`: the files that
    count (None: every file of the directory)."""
    if Path(where).is_dir():
        return {"model_files": fingerprint_dir(where, names)}
    return {"model": where}


def check_tokenizer_beside(model_config: Any, tokenizer: Any, texts: list[str], where: str) -> None:
    """Stock AutoTokenizer on a model directory holding this config and tokenizer must be this tokenizer: for some
    model types (qwen2, phi3, ...) transformers 5 ignores tokenizer_config.json and rebuilds the pipeline with the
    family's class, which can add a token or split text otherwise. Checked in a scratch directory, before anything
    is written; a difference is one line naming the first text."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hyperofa-tokenizer-check-") as scratch:
        model_config.save_pretrained(scratch)
        save_tokenizer(tokenizer, scratch)  # as save_model_dir writes it
        with quiet_transformers():
            loaded = AutoTokenizer.from_pretrained(scratch)
    problem = None
    if len(loaded) != len(tokenizer) or loaded.get_vocab() != tokenizer.get_vocab():
        problem = f"{type(loaded).__name__} has {len(loaded)} tokens, the tokenizer {len(tokenizer)}"
    else:
        for text in texts:
            if loaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
                problem = f"{type(loaded).__name__} encodes {text[:60]!r} differently"
                break
    if problem:
        raise HyperofaError(
            f"{where}: stock AutoTokenizer would not load this tokenizer beside a {model_config.model_type} model "
            f"({problem}); the model directory would not be usable as is"
        )


def save_model_dir(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """save_pretrained of the model and its tokenizer into one directory (written to a sibling, then renamed); the
    tokenizer's config is the portable one (formats/tokenizer.py `save_tokenizer`)."""
    out_dir = Path(out_dir)
    tmp = tmp_name(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def model_files(out_dir: Path) -> list[str]:
    """The files of a saved model directory, relative to its parent (for a stage manifest)."""
    return sorted(f"{out_dir.name}/{p.name}" for p in out_dir.iterdir() if p.is_file())


# --- preflight: a model directory a stage will load ------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int  # embedding rows (config.json)
    tokenizer_size: int
    parameters: int


def check_model(path: Path, key: str, *, mask: bool = False) -> ModelFacts:
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
    return rows == tokens or (kind == CAUSAL and rows > tokens)


def source_vocabulary(config: Any, tokenizer: Any) -> None:
    """The source tokenizer belongs to the source model (`source_rows_fit`), read from a local model's
    config.json: checked by the tokenizer stage, before it builds a target tokenizer on a tokenizer the mapping
    would later refuse."""
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
