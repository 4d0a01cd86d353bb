"""Sentence retrieval (SR-T on Tatoeba, SR-B on the Bible), as the method evaluates it (docs/METHOD.md §5.2).

Per language L, two line-aligned files: `<prefix>.<L>-eng.<L>` + `<prefix>.<L>-eng.eng` (XTREME/LASER) or
`<prefix>.<L>-eng_Latn.<L>` + `<prefix>.<L>-eng_Latn.eng_Latn` (Glot500). Each sentence is encoded as the mean
of one layer's hidden states over every attention-mask position, special tokens included (a causal LM: over its
text tokens only, `pool_special=False`: the BOS position of a trained decoder is an attention sink whose state has
nothing of the sentence and a norm far above the others'; padding is never pooled); English sentences
are the queries, the L sentences the index, similarity is cosine. Acc@k is the share of queries whose aligned
sentence ranks among the k most similar. Ties are broken by line order, so results are deterministic and a
model that maps everything to one vector scores chance-like, not 100%.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from ..formats.text import split_lines
from .languages import resolve

KS = (1, 5, 10)
PAIR_FILE = re.compile(r"^(?P<prefix>.+)\.(?P<lang>[^.\-]+)-(?P<eng>eng(?:_Latn)?)\.(?P<side>[^.]+)$")


@dataclass(frozen=True)
class PairFiles:
    lang: str
    lang_path: Path
    eng_path: Path


def discover_pairs(
    data_dir: str | Path, languages: Optional[Sequence[str]] = None
) -> tuple[dict[str, PairFiles], dict[str, str]]:
    """(language -> its two files, skipped language -> why) for the parallel files of one directory.

    Without `languages` every language is keyed by its code in the file names; with them, each requested code
    (`deu_Latn`, or the files' own `deu`) is found through `languages.resolve` and keys its pair."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HyperofaError(f"{data_dir}: retrieval data directory not found")
    sides: dict[str, dict[str, Path]] = {}
    expected: dict[str, tuple[Path, Path]] = {}
    for path in sorted(data_dir.iterdir()):
        match = PAIR_FILE.match(path.name)
        if not match or not path.is_file():
            continue
        lang, eng, side = match["lang"], match["eng"], match["side"]
        if side not in (lang, eng) or lang in ("eng", "eng_Latn"):
            continue
        stem = data_dir / f"{match['prefix']}.{lang}-{eng}"
        pair = (stem.with_name(f"{stem.name}.{lang}"), stem.with_name(f"{stem.name}.{eng}"))
        if lang in expected and expected[lang] != pair:
            raise HyperofaError(f"{data_dir}: language {lang} has parallel files under two names ({path.name})")
        expected[lang] = pair
        sides.setdefault(lang, {})["lang" if side == lang else "eng"] = path
    found: dict[str, PairFiles] = {}
    skipped: dict[str, str] = {}
    for lang in sorted(expected):
        lang_path, eng_path = expected[lang]
        missing = [p.name for p in (lang_path, eng_path) if not p.is_file()]
        if missing:
            skipped[lang] = f"missing {', '.join(missing)}"
        else:
            found[lang] = PairFiles(lang, lang_path, eng_path)
    if languages is not None:
        codes, unresolved = resolve(languages, expected, "no parallel files")
        found = {key: found[code] for key, code in codes.items() if code in found}
        skipped = {key: skipped[code] for key, code in codes.items() if code in skipped} | unresolved
    return found, skipped


def read_lines_exact(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HyperofaError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return split_lines(text)


def read_pair(pair: PairFiles, max_sentences: Optional[int] = None) -> tuple[list[str], list[str]]:
    """(L sentences, English sentences), line-aligned; different line counts mean misaligned files: an error."""
    lang_lines, eng_lines = read_lines_exact(pair.lang_path), read_lines_exact(pair.eng_path)
    if len(lang_lines) != len(eng_lines):
        raise HyperofaError(
            f"{pair.lang_path}: {len(lang_lines)} lines but its English side {pair.eng_path.name} has "
            f"{len(eng_lines)}; parallel files must be line-aligned"
        )
    if not lang_lines:
        raise HyperofaError(f"{pair.lang_path}: no sentences")
    if max_sentences is not None:
        lang_lines, eng_lines = lang_lines[:max_sentences], eng_lines[:max_sentences]
    return lang_lines, eng_lines


def encode_sentences(
    model: Any,
    tokenizer: Any,
    lines: list[str],
    layer_index: int,
    batch_size: int,
    max_length: int,
    device: Any,
    desc: str = "encode",
    pool_special: bool = True,
) -> Any:
    """Mean-pooled `hidden_states[layer_index]` per sentence, float32 [n, d] on CPU; `pool_special=False` leaves
    the special tokens (BOS) out of the mean.

    Sentences are batched in length order (less padding, same vectors) and returned in input order."""
    import torch
    from tqdm.auto import tqdm

    encoded = tokenizer(lines, truncation=True, max_length=max_length, add_special_tokens=True,
                        return_special_tokens_mask=not pool_special)
    ids = encoded["input_ids"]
    special = None if pool_special else encoded["special_tokens_mask"]
    order = np.argsort(np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), kind="stable")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(ids), model.config.hidden_size, dtype=torch.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False, disable=None):
            rows = order[start : start + batch_size]
            width = max(len(ids[r]) for r in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            pooled_positions = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                batch[i, : len(ids[r])] = torch.tensor(ids[r])
                mask[i, : len(ids[r])] = 1
                pooled_positions[i, : len(ids[r])] = 1 if special is None else 1 - torch.tensor(special[r])
            batch, mask = batch.to(device), mask.to(device)
            hidden = model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states[layer_index]
            weights = pooled_positions.to(device).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            out[torch.as_tensor(rows)] = pooled.float().cpu()
    return out


def retrieval_ranks(queries: Any, index: Any, batch_size: int = 1024) -> np.ndarray:
    """Rank (0 = best) of each query's aligned index row under cosine similarity, by batched matrix products.

    rank_i = #{j : s_ij > s_ii} + #{j < i : s_ij = s_ii}: equal scores go to the earlier line."""
    import torch

    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    x = torch.nn.functional.normalize(torch.as_tensor(index, dtype=torch.float32), dim=1)
    if q.shape != x.shape:
        raise ValueError(f"queries {tuple(q.shape)} and index {tuple(x.shape)} must be aligned row for row")
    n = q.shape[0]
    columns = torch.arange(n)
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, batch_size):
        rows = columns[start : start + batch_size]
        scores = q[rows] @ x.T
        own = scores[torch.arange(len(rows)), rows].unsqueeze(1)
        earlier = columns.unsqueeze(0) < rows.unsqueeze(1)
        ranks[rows] = (scores > own).sum(1) + ((scores == own) & earlier).sum(1)
    return ranks.numpy()


def topk_accuracy(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """{'top1': %, 'top5': %, 'top10': %}: the share of queries whose aligned sentence ranks below k."""
    ranks = np.asarray(ranks)
    return {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    *,
    layer_index: int,
    center: bool = False,
    languages: Optional[Sequence[str]] = None,
    batch_size: int = 128,
    max_length: int = 512,
    max_sentences: Optional[int] = None,
    device: Any = "cpu",
    task: str = "retrieval",
    pool_special: bool = True,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({language: {top1, top5, top10}}, {skipped language: why}) for every complete pair under data_dir."""
    pairs, skipped = discover_pairs(data_dir, languages)
    if not pairs:
        raise HyperofaError(f"{data_dir}: no complete parallel file pairs for {task}" + _skipped_note(skipped))
    # Read (and so validate) every pair before the slow encoding starts.
    texts = {lang: read_pair(pair, max_sentences) for lang, pair in pairs.items()}
    results = {}
    for lang, (lang_lines, eng_lines) in texts.items():
        encode = dict(layer_index=layer_index, batch_size=batch_size, max_length=max_length, device=device,
                      pool_special=pool_special)
        index = encode_sentences(model, tokenizer, lang_lines, desc=f"{task} {lang}", **encode)
        queries = encode_sentences(model, tokenizer, eng_lines, desc=f"{task} {lang} eng", **encode)
        if center:
            # Removing each side's mean vector takes out the language- and model-wide component that dominates
            # the cosine of small or anisotropic encoders (Libovicky et al. 2020, "language-neutral" centering).
            index, queries = index - index.mean(0), queries - queries.mean(0)
        results[lang] = topk_accuracy(retrieval_ranks(queries, index))
    return results, skipped


def _skipped_note(skipped: dict[str, str]) -> str:
    if not skipped:
        return ""
    return " (skipped: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")"
