"""The model card (`README.md`) of every exported model directory: the one writer.

`init/<method>/model/` and `pretrain/<method>/model/` each get a card saying what the model is, from what the
exporting stage knows: the base model, the init method, the languages and data, the source and target tokenizer
sizes, the training steps and the held-out metrics of that stage (the step-0 new-token loss at init, the final
held-out loss after pretraining). The licence is left for whoever publishes the model to fill in (the base model's
and the data's licences decide it); the card says so. The card is deterministic: the same run writes the same bytes.
Publishing is the user's step (`docs/EXPORT.md`: `push_to_hub`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .files import atomic_write_bytes

CARD = "README.md"

METHODS = {
    "random": "new tokens get random embeddings drawn from the source embeddings' per-coordinate mean and std",
    "mean": "each new token gets the mean of the source embeddings of the pieces the source tokenizer splits it into",
    "ofa": "OFA: each new token's embedding is a similarity-weighted mix of source token embeddings, through "
           "multilingual word vectors",
    "hyperofa": "HyperOFA: a hypernetwork trained on the overlapping tokens predicts each new token's embedding "
                "from multilingual word vectors",
}
LICENCE_NOTE = ("Left for the publisher to fill in: the licences of the base model and of the training data "
                "decide what this model may be released under.")


@dataclass
class ModelCard:
    """What an exporting stage knows about the model it writes."""

    base_model: str
    method: str
    stage: str  # "init" or "pretrain"
    kind: str  # "masked" or "causal"
    languages: list[str]
    data: list[str]  # lines describing the training data
    source_vocab: Optional[int]
    target_vocab: Optional[int]
    model_vocab: Optional[int]
    steps: int
    target_tokenizer: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric name -> {language: value}


def corpus_facts(config: Any) -> tuple[list[str], list[str]]:
    """(languages, data lines) of a run: the languages prepare wrote blocks for (else the configured ones) and where
    the text came from, from the config and the prepare manifest."""
    from .rundir import Stage

    prepared = Stage(config.run_dir, "prepare").manifest() or {}
    counts = prepared.get("counts") or {}
    per_language = counts.get("languages") or {}
    languages = sorted(lang for lang, stats in per_language.items()
                       if not isinstance(stats, dict) or stats.get("train_blocks", 1))
    if not languages:
        languages = sorted(config.corpus.languages or [])
    corpus = config.corpus
    where = corpus.hub_name if corpus.format == "hub" else (corpus.path or "")
    line = f"corpus: `{where}` ({corpus.format})"
    for key in ("revision", "split"):
        value = getattr(corpus, key, None)
        if value:
            line += f", {key} `{value}`"
    data = [line]
    totals = counts.get("totals") or {}
    if totals:
        block = prepared.get("block_size")
        size = f" of {block} tokens" if block else ""
        data.append(f"prepared: {totals.get('train_blocks', 0)} training and {totals.get('heldout_blocks', 0)} "
                    f"held-out blocks{size}")
    return languages, data


def _iso_codes(languages: list[str]) -> list[str]:
    return sorted({lang.split("_")[0] for lang in languages})


def render(card: ModelCard) -> str:
    pipeline = "fill-mask" if card.kind == "masked" else "text-generation"
    local = Path(card.base_model).expanduser().exists()  # the hub wants a repository id here, not a path
    front = {
        **({} if local else {"base_model": card.base_model}),
        "language": _iso_codes(card.languages),
        "library_name": "transformers",
        "pipeline_tag": pipeline,
        "tags": ["hyperofa", "vocabulary-expansion", card.method],
    }
    lines = ["---"]
    for key, value in front.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v, ensure_ascii=False)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    if local:
        lines.append(f"# base_model: fill in the hub id of the local copy {card.base_model}")
    lines += ["license: null  # fill in: see the Licence section", "---", ""]
    trained = (f"then continued pretraining for {card.steps} steps" if card.stage == "pretrain"
               else "not trained after initialisation (step 0)")
    lines += [
        f"# {Path(card.base_model).name} with a new vocabulary ({card.method})",
        "",
        f"The {card.kind} LM `{card.base_model}` with its vocabulary replaced by the target tokenizer's, made with "
        f"hyperofa-dist: new-token embeddings initialised with `{card.method}`, {trained}.",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | `{card.base_model}` |",
        f"| Method | `{card.method}`: {METHODS.get(card.method, card.method)} |",
        f"| Stage | {card.stage} |",
        f"| Training steps | {card.steps} |",
        f"| Source tokenizer | {_size(card.source_vocab)} tokens |",
        f"| Target tokenizer | {_size(card.target_vocab)} tokens (`{card.target_tokenizer}`) |",
        f"| Embedding rows | {_size(card.model_vocab)} |",
        f"| Languages | {len(card.languages)}: {', '.join(card.languages) or 'not recorded'} |",
        *(f"| Data | {line} |" for line in card.data),
        "",
        "## Held-out metrics",
        "",
    ]
    if card.metrics:
        names = list(card.metrics)
        langs = sorted({lang for values in card.metrics.values() for lang in values})
        lines += ["| language | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for lang in langs:
            cells = [_number(card.metrics[name].get(lang)) for name in names]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    else:
        lines.append("None recorded by this stage (no held-out blocks).")
    auto = "AutoModelForMaskedLM" if card.kind == "masked" else "AutoModelForCausalLM"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "The tokenizer is the stock `PreTrainedTokenizerFast` over `tokenizer.json`; transformers 4.57 and 5.x load it.",
        "",
        "## Licence",
        "",
        LICENCE_NOTE + " Set `license:` at the top of this file and complete this section before publishing.",
        "",
    ]
    return "\n".join(lines)


def _size(n: Optional[int]) -> str:
    return "?" if n is None else str(n)


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{float(value):.4f}"


def write_model_card(model_dir: str | Path, card: ModelCard) -> Path:
    """Write `model_dir/README.md` (atomically)."""
    return atomic_write_bytes(Path(model_dir) / CARD, render(card).encode("utf-8"))
