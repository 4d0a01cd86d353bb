"""Zero-shot cross-lingual tagging (POS, NER), as the method evaluates it (docs/METHOD.md §5.3).

A stock `AutoModelForTokenClassification` (the encoder plus a fresh linear head) is fine-tuned on English train
data; every `select_every` optimizer steps (the reference: NER 1000, POS 500) and after the last one the model is
scored on English dev, the candidate with the best dev F1 is kept (the earliest on a tie), and it tags every other
language's test file. A model with its factorised form beside it (F_t.npy, P.npy) is fine-tuned factorised, as the
reference does at step 0 and after factorised pretraining: English fine-tuning then moves P, and with it every
token's embedding. Files are `{train,dev,test}-<lang>.conllu` (POS: the UPOS column) or `{train,dev,test}-<lang>.tsv`
(`token<TAB>label`, blank line between sentences; the XTREME preprocessed form of WikiANN and UD).

Input as the reference builds it: every word tokenized alone, the first subword carries its label (the rest and
the special tokens are ignored), RoBERTa/XLM-R sentences framed `<s> ... </s></s>` (`sep_token_extra`; BERT keeps
`[CLS] ... [SEP]`), and a sentence longer than the budget (max_length minus the specials: 253 of 256) cut into
pieces before it is framed. F1 is seqeval's (micro, chunk-based, also for POS, to match the method's numbers),
each piece scored as its own sequence as the reference does (`score_unit: sentence` joins a sentence's pieces
again); POS also reports token accuracy.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import HyperofaError
from ..formats.models import load_model
from ..formats.text import split_lines
from ..models import sep_token_extra
from .languages import resolve

IGNORE = -100
SPLITS = ("train", "dev", "test")
TAG_FILE = re.compile(r"^(?P<split>train|dev|test)-(?P<lang>[^.]+)\.(?P<ext>conllu|tsv)$")
MISSING_LABEL = {"pos": "X", "ner": "O"}


@dataclass
class Sentence:
    words: list[str]
    labels: list[str]


def _blank_separated(path: Path, word_of: Callable[[str, int], Optional[tuple[str, str]]]) -> list[Sentence]:
    """Sentences separated by blank lines; `word_of(line, number)` gives (word, label) or None to skip a line."""
    sentences, words, labels = [], [], []
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            if words:
                sentences.append(Sentence(words, labels))
                words, labels = [], []
            continue
        item = word_of(line, number)
        if item is not None:
            words.append(item[0])
            labels.append(item[1])
    if words:
        sentences.append(Sentence(words, labels))
    return sentences


def read_conllu(path: Path) -> list[Sentence]:
    """UPOS-tagged sentences of a CoNLL-U file; multiword-token ranges and empty nodes are not words."""

    def word_of(line: str, number: int) -> Optional[tuple[str, str]]:
        if line.startswith("#"):
            return None
        cols = line.split("\t")
        if len(cols) != 10:
            raise HyperofaError(f"{path}:{number}: CoNLL-U lines have 10 tab-separated columns, found {len(cols)}")
        if "-" in cols[0] or "." in cols[0]:
            return None
        return cols[1], cols[3] if cols[3] not in ("", "_") else "X"

    return _blank_separated(path, word_of)


def read_token_label(path: Path, missing_label: str) -> list[Sentence]:
    """`token<TAB>label` lines, a blank line between sentences; a token without a label gets `missing_label`."""

    def word_of(line: str, number: int) -> tuple[str, str]:
        cols = line.split("\t")
        if len(cols) > 2:
            raise HyperofaError(f"{path}:{number}: expected token<TAB>label, found {len(cols)} columns")
        return cols[0], cols[1].strip() if len(cols) == 2 and cols[1].strip() else missing_label

    return _blank_separated(path, word_of)


def _lines(path: Path) -> list[str]:
    try:
        return split_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise HyperofaError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_tagged(path: Path, task: str) -> list[Sentence]:
    sentences = read_conllu(path) if path.suffix == ".conllu" else read_token_label(path, MISSING_LABEL[task])
    if not sentences:
        raise HyperofaError(f"{path}: no sentences")
    return sentences


def discover_tagging(data_dir: str | Path) -> dict[str, dict[str, Path]]:
    """language -> split -> file; a `.conllu` and a `.tsv` for the same split and language is ambiguous."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HyperofaError(f"{data_dir}: tagging data directory not found")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(data_dir.iterdir()):
        match = TAG_FILE.match(path.name)
        if not match or not path.is_file():
            continue
        slot = found.setdefault(match["lang"], {})
        if match["split"] in slot:
            raise HyperofaError(f"{data_dir}: both {slot[match['split']].name} and {path.name}; keep one")
        slot[match["split"]] = path
    return found


# --- features ---------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """One model input: ids framed by specials, the positions of first subwords, and the gold labels there."""

    input_ids: list[int]
    positions: list[int]
    gold: list[str]


def word_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, list[int]]:
    """Subword ids of each distinct word tokenized alone (as the reference does), in one batched call."""
    unique = sorted(set(words))
    if not unique:
        return {}
    encoded = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return dict(zip(unique, encoded))


def to_pieces(sentences: list[Sentence], tokenizer: Any, max_length: int,
              extra_sep: bool = False) -> tuple[list[Piece], list[int]]:
    """(pieces, pieces per sentence): sentences cut so that every piece fits max_length with its specials (the
    opening one and one or, with `extra_sep`, two closing separators)."""
    closing = 2 if extra_sep else 1
    budget = max_length - 1 - closing
    if budget < 1:
        raise HyperofaError(f"evaluate.tagging.max_length={max_length} leaves no room for words")
    unk = tokenizer.unk_token_id
    cls_id, sep_id = _frame_ids(tokenizer)
    end = [sep_id] * closing
    vocab = word_ids(tokenizer, [w for s in sentences for w in s.words])
    pieces: list[Piece] = []
    counts: list[int] = []
    for sentence in sentences:
        before = len(pieces)
        ids, positions, gold = [cls_id], [], []
        for word, label in zip(sentence.words, sentence.labels):
            sub = vocab[word]
            if not sub or len(sub) > budget:
                sub = [unk]
            if len(ids) - 1 + len(sub) > budget:
                pieces.append(Piece(ids + end, positions, gold))
                ids, positions, gold = [cls_id], [], []
            positions.append(len(ids))
            gold.append(label)
            ids.extend(sub)
        if positions:
            pieces.append(Piece(ids + end, positions, gold))
        counts.append(len(pieces) - before)
    return pieces, counts


def _frame_ids(tokenizer: Any) -> tuple[int, int]:
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None:
        raise HyperofaError("the model's tokenizer has no cls/sep (or bos/eos) tokens to frame a sentence")
    return cls_id, sep_id


def _batch(pieces: list[Piece], pad: int, label_ids: Optional[dict[str, int]], device: Any):
    import torch

    width = max(len(p.input_ids) for p in pieces)
    ids = torch.full((len(pieces), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    labels = torch.full((len(pieces), width), IGNORE, dtype=torch.long)
    for i, piece in enumerate(pieces):
        ids[i, : len(piece.input_ids)] = torch.tensor(piece.input_ids)
        mask[i, : len(piece.input_ids)] = 1
        if label_ids is not None:
            labels[i, piece.positions] = torch.tensor([label_ids[g] for g in piece.gold])
    return ids.to(device), mask.to(device), labels.to(device)


# --- metrics ----------------------------------------------------------------------------------------------


def tagging_scores(gold: list[list[str]], pred: list[list[str]], accuracy: bool) -> dict[str, float]:
    """seqeval micro precision/recall/F1 in % (chunk-based, as the method reports POS too), optional accuracy."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    with warnings.catch_warnings():
        # Plain UPOS tags are not BIO tags; seqeval warns once per chunk. Scoring them anyway is the method's
        # choice (docs/METHOD.md §5.3), so the warning carries no news.
        warnings.filterwarnings("ignore", message=".*seems not to be NE tag", category=UserWarning)
        scores = {
            "f1": 100.0 * float(f1_score(gold, pred, zero_division=0)),
            "precision": 100.0 * float(precision_score(gold, pred, zero_division=0)),
            "recall": 100.0 * float(recall_score(gold, pred, zero_division=0)),
        }
    if accuracy:
        flat_gold = [t for s in gold for t in s]
        flat_pred = [t for s in pred for t in s]
        scores["accuracy"] = 100.0 * float(np.mean([g == p for g, p in zip(flat_gold, flat_pred)]))
    return scores


# --- fine-tuning and zero-shot testing ---------------------------------------------------------------------


# Optimizer steps between English-dev selections in the reference's scripts.
SELECT_EVERY = {"ner": 1000, "pos": 500}


@dataclass
class TaggingSettings:
    epochs: int = 10
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 256
    weight_decay: float = 0.0
    seed: int = 1
    max_train_sentences: Optional[int] = None
    max_test_sentences: Optional[int] = None
    select_every: Optional[int] = None  # None: SELECT_EVERY[task]
    score_unit: str = "piece"  # or "sentence"
    factors_dir: Optional[Path] = None  # fine-tune factorised: F_t.npy and P.npy there


@dataclass
class TaggingOutcome:
    per_language: dict[str, dict[str, float]]
    skipped: dict[str, str]
    best_step: int
    dev_f1: float
    steps: int = 0
    candidates: dict[int, float] = field(default_factory=dict)  # step -> English dev F1
    factorised: bool = False


def predict(model: Any, pieces: list[Piece], id2label: list[str], pad: int, batch_size: int, device: Any):
    import torch

    model.eval()
    out: list[list[str]] = []
    with torch.inference_mode():
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start : start + batch_size]
            ids, mask, _ = _batch(chunk, pad, None, device)
            best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu()
            for i, piece in enumerate(chunk):
                out.append([id2label[int(k)] for k in best[i, piece.positions]])
    return out


def _score_sequences(counts: list[int], values: list[list[str]], unit: str) -> list[list[str]]:
    return _regroup(counts, values) if unit == "sentence" else values


def _regroup(pieces_per_sentence: list[int], values: list[list[str]]) -> list[list[str]]:
    """Pieces of one sentence back into one sequence, so seqeval sees whole sentences."""
    out, k = [], 0
    for count in pieces_per_sentence:
        merged: list[str] = []
        for piece in values[k : k + count]:
            merged.extend(piece)
        out.append(merged)
        k += count
    return out


def evaluate_tagging(
    model_dir: Path,
    tokenizer: Any,
    data_dir: str | Path,
    task: str,
    *,
    english: str = "eng_Latn",
    languages: Optional[Sequence[str]] = None,
    settings: TaggingSettings = TaggingSettings(),
    device: Any = "cpu",
) -> TaggingOutcome:
    """Fine-tune on English train, keep the best English-dev epoch, test every language that has a test file."""
    import torch
    from tqdm.auto import tqdm

    if task not in MISSING_LABEL:
        raise ValueError(f"unknown tagging task {task!r}")
    files = discover_tagging(data_dir)
    eng = resolve([english], files, "")[0].get(english)
    if eng is None:
        raise HyperofaError(f"{data_dir}: no English files (train-{english}.tsv/.conllu) to fine-tune {task}")
    for split in ("train", "dev"):
        if split not in files[eng]:
            raise HyperofaError(
                f"{data_dir}: {split}-{eng} is missing; {task} trains on English train and selects by English dev"
            )
    train = read_tagged(files[eng]["train"], task)[: settings.max_train_sentences]
    dev = read_tagged(files[eng]["dev"], task)
    label_names = sorted({label for s in train + dev for label in s.labels})
    label_ids = {name: i for i, name in enumerate(label_names)}

    tests, skipped = {}, {}
    if languages is None:
        chosen = {code: code for code in sorted(files)}
    else:  # requested codes (English always) key their files' results
        chosen, skipped = resolve([english, *languages], files, "no files")
    for key, code in chosen.items():
        if "test" in files[code]:
            tests[key] = files[code]["test"]
        else:
            skipped[key] = "no test file"
    test_sentences = {lang: read_tagged(path, task)[: settings.max_test_sentences] for lang, path in tests.items()}

    torch.manual_seed(settings.seed)
    model = load_model(
        model_dir,
        "AutoModelForTokenClassification",
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id=label_ids,
    )
    if settings.factors_dir is not None:
        from ..formats.init import load_factors
        from ..models.factorised import factorise

        factorise(model, *load_factors(settings.factors_dir))
    model.to(device)
    extra_sep = sep_token_extra(getattr(model.config, "model_type", None))
    unit = settings.score_unit
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_pieces, _ = to_pieces(train, tokenizer, settings.max_length, extra_sep)
    dev_pieces, dev_counts = to_pieces(dev, tokenizer, settings.max_length, extra_sep)
    dev_gold = _score_sequences(dev_counts, [p.gold for p in dev_pieces], unit)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, eps=1e-8, weight_decay=settings.weight_decay
    )
    steps_per_epoch = -(-len(train_pieces) // settings.batch_size)
    total = max(1, steps_per_epoch * settings.epochs)
    every = settings.select_every or SELECT_EVERY[task]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    order_rng = np.random.default_rng(settings.seed)
    candidates: dict[int, float] = {}
    best_f1, best_step, best_state = -1.0, 0, None

    def select(step: int) -> None:
        nonlocal best_f1, best_step, best_state
        pred = _score_sequences(dev_counts, predict(model, dev_pieces, label_names, pad, settings.batch_size, device), unit)
        f1 = tagging_scores(dev_gold, pred, accuracy=False)["f1"]
        candidates[step] = f1
        if f1 > best_f1:  # strictly better: a tie keeps the earlier candidate
            best_f1, best_step = f1, step
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.train()

    step = 0
    for _ in tqdm(range(1, settings.epochs + 1), desc=f"{task} fine-tune", leave=False, disable=None):
        model.train()
        order = order_rng.permutation(len(train_pieces))
        for start in range(0, len(order), settings.batch_size):
            chunk = [train_pieces[i] for i in order[start : start + settings.batch_size]]
            ids, mask, labels = _batch(chunk, pad, label_ids, device)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % every == 0 and step != total:
                select(step)
    select(step)  # the final model is always a candidate
    if best_state is not None and best_step != step:
        model.load_state_dict(best_state)

    per_language = {}
    for lang, sentences in test_sentences.items():
        pieces, counts = to_pieces(sentences, tokenizer, settings.max_length, extra_sep)
        gold = _score_sequences(counts, [p.gold for p in pieces], unit)
        pred = _score_sequences(counts, predict(model, pieces, label_names, pad, settings.batch_size, device), unit)
        per_language[lang] = tagging_scores(gold, pred, accuracy=task == "pos")
    return TaggingOutcome(per_language, skipped, best_step, best_f1, step, candidates, settings.factors_dir is not None)
