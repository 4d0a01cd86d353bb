"""SentencePiece-only tokenizer folders as published before `tokenizer.json` (Glot500's `cis-lmu/glot500-base`,
XLM-R-era checkpoints): `sentencepiece.bpe.model`, an XLM-R-style `tokenizer_config.json` naming
`XLMRobertaTokenizer`, and `special_tokens_map.json`. The model is trained with the `sentencepiece` library itself,
Unigram or BPE, deterministically (one thread, fixed seed sentence count)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

XLMR_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                 "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}


def train_sentencepiece_folder(texts: Iterable[str], out_dir: str | Path, model_type: str = "unigram",
                               vocab_size: int = 400) -> Path:
    """Train a SentencePiece `model_type` ("unigram" or "bpe") model on `texts` and write the published folder."""
    import sentencepiece

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, num_threads=1, minloglevel=2, seed_sentencepiece_size=100_000,
    )
    (out_dir / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": 512,
        **XLMR_SPECIALS,
        # As XLM-R publishes it: <mask> swallows the space before it.
        "mask_token": {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": True,
                       "rstrip": False, "single_word": False},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(XLMR_SPECIALS, indent=2) + "\n", encoding="utf-8")
    return out_dir
