"""The expanded model in stock HF format: the source architecture with the target vocabulary (docs/METHOD.md §1.10, §4.1, §7).

Masked LMs (`build_expanded_model`):

Everything except the vocabulary-sized tensors is copied from the source model (encoder, position and token-type
embeddings, embedding LayerNorm, the LM-head transform). The word embeddings become E_t, the decoder stays tied to
them, and the output bias, which the reference left at a random init over 401k tokens, is the source bias for
copied tokens and the mean source bias for every other token. The result loads with `AutoModelForMaskedLM` and
`AutoTokenizer` and no custom code.

Vocabulary padding (`pad_to_multiple_of`): rows V_t .. V_pad-1 exist only so the matrix shape suits tensor cores;
the tokenizer never emits them. They get a zero embedding and the mean source bias, and the stage manifest
records `padded_rows`.

Causal LMs (`build_expanded_causal_model`): the source model itself is resized (`resize_token_embeddings`, no
second copy of the weights in memory) and every vocabulary row rewritten: copied tokens get their source rows
exactly, in the input embedding and, when untied, in the output projection, so on text the target tokenizer
encodes with source ids the expanded model gives the source's logits over those ids (§8); every other row is
the init method's (E_t = F_t P, or F_t P_out for the output side). A tied model stays tied. The result loads with
`AutoModelForCausalLM` and `AutoTokenizer`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import HyperofaError
from . import masked_family


def special_token_pairs(
    source_tokenizer: Any, target_tokenizer: Any, target_name: str = "target tokenizer", kind: str = "masked"
):
    """(target_ids, source_ids, {target token: source token}) for every special token of the target tokenizer.

    The pairing is the mapping stage's (`vocab.special_pairs`: by role, cls<->bos and sep<->eos as fallbacks,
    role-less extras by identical text); here every target special token must get a partner, and a masked LM
    needs a pad and a mask token (a causal LM needs neither). A special token left unpaired would silently become
    a random row.
    """
    from ..vocab import special_ids, special_pairs

    for role in ("pad_token", "mask_token") if kind == "masked" else ():
        if getattr(target_tokenizer, role, None) is None:
            raise HyperofaError(f"{target_name}: has no {role}; a masked LM needs one")
    pairs = special_pairs(target_tokenizer, source_tokenizer)
    for t_id in sorted(special_ids(target_tokenizer)):
        if t_id not in pairs:
            token = target_tokenizer.convert_ids_to_tokens(t_id)
            raise HyperofaError(
                f"{target_name}: special token {token!r} (id {t_id}) cannot be mapped: the source tokenizer has no "
                "token of the same role or text"
            )
    t_ids = np.array(sorted(pairs), dtype=np.int64)
    s_ids = np.array([pairs[t] for t in t_ids], dtype=np.int64)
    if len(t_ids) and (t_ids.max() >= len(target_tokenizer) or s_ids.max() >= len(source_tokenizer)):
        raise HyperofaError(f"{target_name}: a special token id lies outside the vocabulary")
    names = {
        target_tokenizer.convert_ids_to_tokens(int(t)): source_tokenizer.convert_ids_to_tokens(int(s))
        for t, s in zip(t_ids, s_ids)
    }
    return t_ids, s_ids, names


def merge_copy_pairs(overlap_target, overlap_source, special_target, special_source):
    """Overlap pairs with the special-token pairs taking precedence for their target ids; sorted by target id."""
    overlap_target = np.asarray(overlap_target, dtype=np.int64)
    keep = ~np.isin(overlap_target, special_target)
    t = np.concatenate([overlap_target[keep], special_target])
    s = np.concatenate([np.asarray(overlap_source, dtype=np.int64)[keep], special_source])
    order = np.argsort(t, kind="stable")
    return t[order], s[order]


@dataclass
class ExportInfo:
    family: str
    vocab_size: int  # len(target tokenizer)
    model_vocab_size: int  # rows of the embedding matrix (>= vocab_size with padding)
    padded_rows: list[int] = field(default_factory=list)  # [first, end) of the padding rows, empty without
    position_shift: int = 0  # position table shift when the pad id moved (families counting positions from it)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def build_expanded_model(
    source_model: Any,
    source_tokenizer: Any,
    target_tokenizer: Any,
    embeddings: np.ndarray,
    copy_target_ids: np.ndarray,
    copy_source_ids: np.ndarray,
    pad_to_multiple_of: Optional[int] = None,
):
    """(model, ExportInfo): the source architecture over the target vocabulary with word embeddings E_t.

    `copy_*_ids` are the copied tokens (overlap and special tokens), whose output bias is the source bias.
    """
    import torch

    family = masked_family(source_model.config)
    vocab_size = len(target_tokenizer)
    if embeddings.shape[0] != vocab_size:
        raise HyperofaError(f"E_t has {embeddings.shape[0]} rows but the target tokenizer has {vocab_size} tokens")
    hidden = source_model.config.hidden_size
    if embeddings.shape[1] != hidden:
        raise HyperofaError(f"E_t has dimension {embeddings.shape[1]} but the source model's hidden size is {hidden}")
    model_vocab = _round_up(vocab_size, pad_to_multiple_of)

    cfg = copy.deepcopy(source_model.config)
    cfg.vocab_size = model_vocab
    cfg.tie_word_embeddings = True
    old_pad = source_model.config.pad_token_id
    cfg.pad_token_id = target_tokenizer.pad_token_id
    id_map = dict(zip(np.asarray(copy_source_ids).tolist(), np.asarray(copy_target_ids).tolist()))
    shift = family.expand_config(cfg, source_model.config, target_tokenizer, id_map)

    state = {k: v for k, v in source_model.state_dict().items()}
    source_bias = source_model.get_output_embeddings().bias.detach().float().cpu().numpy()[: len(source_tokenizer)]
    model = type(source_model)(cfg).float()
    vocab_keys = set(family.vocab_keys)
    if shift:
        family.shift_positions(state, old_pad, cfg.pad_token_id)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in vocab_keys}, strict=False)
    unexplained = [k for k in missing if k not in vocab_keys]
    if unexplained or unexpected:
        raise HyperofaError(
            f"source model: cannot copy weights into the expanded model (missing {unexplained[:3]}, "
            f"unexpected {unexpected[:3]})"
        )

    weight = torch.zeros(model_vocab, hidden, dtype=torch.float32)
    weight[:vocab_size] = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    bias = np.full(model_vocab, float(source_bias.astype(np.float64).mean()), dtype=np.float32)
    bias[np.asarray(copy_target_ids, dtype=np.int64)] = source_bias[np.asarray(copy_source_ids, dtype=np.int64)]
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(weight)
        model.tie_weights()
        decoder = model.get_output_embeddings()
        decoder.bias.copy_(torch.from_numpy(bias))
    _require_tied(model)
    model.eval()
    info = ExportInfo(
        family=family.name,
        vocab_size=vocab_size,
        model_vocab_size=model_vocab,
        padded_rows=[vocab_size, model_vocab] if model_vocab > vocab_size else [],
        position_shift=shift,
    )
    return model, info


def _require_tied(model: Any) -> None:
    emb = model.get_input_embeddings().weight
    dec = model.get_output_embeddings().weight
    if emb.data_ptr() != dec.data_ptr():
        raise RuntimeError("expanded model: decoder weight is not tied to the word embeddings")


def build_expanded_any(
    source_model: Any,
    source_tokenizer: Any,
    target_tokenizer: Any,
    embeddings: np.ndarray,
    copy_t: np.ndarray,
    copy_s: np.ndarray,
    pad_to_multiple_of: Optional[int],
    *,
    causal: bool,
    untied: bool,
) -> tuple[Any, Any]:
    """The expanded model of either kind from init's full embeddings: a causal LM's input rows are the first
    `hidden` columns, an untied one's output rows the columns after them."""
    if not causal:
        return build_expanded_model(
            source_model, source_tokenizer, target_tokenizer, embeddings, copy_t, copy_s, pad_to_multiple_of
        )
    hidden = source_model.get_input_embeddings().embedding_dim
    return build_expanded_causal_model(
        source_model, target_tokenizer, embeddings[:, :hidden], embeddings[:, hidden:] if untied else None,
        copy_t, copy_s, pad_to_multiple_of,
    )


# Config keys naming a special token id, rewritten to the target id of the same token.
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def build_expanded_causal_model(
    source_model: Any,
    target_tokenizer: Any,
    input_rows: np.ndarray,
    output_rows: Optional[np.ndarray],
    copy_target_ids: np.ndarray,
    copy_source_ids: np.ndarray,
    pad_to_multiple_of: Optional[int] = None,
):
    """(model, ExportInfo): the causal source model, resized in place, over the target vocabulary.

    `input_rows` [V_t, D] are the method's input embeddings and `output_rows` [V_t, D] its output rows (None for a
    tied model); copied tokens (`copy_*_ids`, specials included) take the source rows instead, in both matrices.
    Rows V_t .. of a padded vocabulary are zero (the tokenizer never emits them). Special-token ids in the config
    and the generation config follow their tokens. `source_model` is consumed: it becomes the expanded model.
    """
    import torch

    from ..formats.models import tied_output

    vocab_size = len(target_tokenizer)
    embedding = source_model.get_input_embeddings()
    hidden = embedding.weight.shape[1]
    tied = tied_output(source_model)
    if tuple(input_rows.shape) != (vocab_size, hidden):
        raise HyperofaError(f"E_t has shape {tuple(input_rows.shape)}; the target tokenizer and the source model "
                            f"need ({vocab_size}, {hidden})")
    if not tied and (output_rows is None or tuple(output_rows.shape) != (vocab_size, hidden)):
        raise HyperofaError(f"the untied output rows must have shape ({vocab_size}, {hidden})")
    model_vocab = _round_up(vocab_size, pad_to_multiple_of)
    copy_t = np.asarray(copy_target_ids, dtype=np.int64)
    copy_s = np.asarray(copy_source_ids, dtype=np.int64)
    dtype = embedding.weight.dtype

    def rows(method_rows: np.ndarray, source_weight: Any) -> Any:
        out = torch.zeros(model_vocab, hidden, dtype=dtype)
        out[:vocab_size] = torch.from_numpy(np.ascontiguousarray(method_rows, dtype=np.float32)).to(dtype)
        out[torch.from_numpy(copy_t)] = source_weight.detach()[torch.from_numpy(copy_s)].to(dtype)
        return out

    head = source_model.get_output_embeddings()
    new_input = rows(input_rows, embedding.weight)
    new_output = None if tied else rows(output_rows, head.weight)
    bias = None
    if head.bias is not None:  # e.g. Phi: copied tokens keep their bias, every other row the mean source bias
        source_bias = head.bias.detach().double()
        bias = torch.full((model_vocab,), float(source_bias.mean()), dtype=torch.float64)
        bias[torch.from_numpy(copy_t)] = source_bias[torch.from_numpy(copy_s)]
    id_map = dict(zip(copy_s.tolist(), copy_t.tolist()))
    config_ids = {key: getattr(source_model.config, key, None) for key in _ID_KEYS}

    source_model.resize_token_embeddings(model_vocab, mean_resizing=False)
    model = source_model
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_input)
        if new_output is not None:
            model.get_output_embeddings().weight.copy_(new_output)
        if bias is not None:
            model.get_output_embeddings().bias.copy_(bias.to(dtype))
    if tied:
        model.tie_weights()
        _require_tied(model)
    def moved(value: Any) -> Any:  # an id, or a list of them (Llama 3 Instruct ends on two tokens)
        if isinstance(value, int):
            return id_map.get(value, value)
        return [moved(v) for v in value] if isinstance(value, list) else value

    for key, value in config_ids.items():
        setattr(model.config, key, moved(value))
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(generation, key, None) is not None:
            setattr(generation, key, moved(getattr(generation, key)))
    model.eval()
    info = ExportInfo(
        family=str(model.config.model_type),
        vocab_size=vocab_size,
        model_vocab_size=model_vocab,
        padded_rows=[vocab_size, model_vocab] if model_vocab > vocab_size else [],
    )
    return model, info
