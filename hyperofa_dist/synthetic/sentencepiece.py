"""SentencePiece-only tokenizer folders as published before `tokenizer.json`: Glot500's `cis-lmu/glot500-base` and
XLM-R-era checkpoints (`sentencepiece.bpe.model`, a `tokenizer_config.json` naming `XLMRobertaTokenizer`,
`special_tokens_map.json`), older Llama (`tokenizer.model`, BPE with byte fallback, `LlamaTokenizer`) and mT5/T5
(`spiece.model`, Unigram, `T5Tokenizer` with its sentinel tokens). The model is trained with the `sentencepiece`
library itself, Unigram or BPE, deterministically (one thread)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

XLMR_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                 "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}
# family -> (model file, tokenizer_config.json, special_tokens_map.json, trainer settings)
LAYOUTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "xlmr": ("sentencepiece.bpe.model", {
        "tokenizer_class": "XLMRobertaTokenizer", **XLMR_SPECIALS,
        # As XLM-R publishes it: <mask> swallows the space before it.
        "mask_token": {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": True,
                       "rstrip": False, "single_word": False},
    }, XLMR_SPECIALS, {}),
    "llama": ("tokenizer.model", {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              {"byte_fallback": True, "character_coverage": 0.995}),
    "t5": ("spiece.model", {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
                            "pad_token": "<pad>", "extra_ids": 8},
           {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
           {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}),
}


def train_sentencepiece_folder(texts: Iterable[str], out_dir: str | Path, model_type: str = "unigram",
                               vocab_size: int = 400, family: str = "xlmr") -> Path:
    """Train a SentencePiece `model_type` ("unigram" or "bpe") model on `texts` and write the folder as `family`
    ("xlmr", "llama" or "t5") publishes it."""
    import sentencepiece

    model_file, config, specials, settings = LAYOUTS[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        num_threads=1, minloglevel=2, seed_sentencepiece_size=100_000,
        **{"character_coverage": 1.0, **settings},
    )
    (out_dir / model_file).write_bytes(model.getvalue())
    config = {**config, "model_max_length": 512}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return out_dir
