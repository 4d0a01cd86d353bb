"""Fit an MLM head for a source model published without one (a sentence encoder), for the real-text check of
docs/METHOD.md §3.11, and save the model with that head so that `source.mlm_head=OUT_DIR` copies it.

    python checks/fit_head.py SOURCE_DIR OUT_DIR TEXT_FILE... [--seed 0] [--epochs 30]

Why: with a head made from a seed, the step-0 loss at new-token positions measures how a random projection of the
encoder's output happens to meet each method's rows, not whether the rows sit where the encoder expects those
tokens; on the check it moved more with the head's seed than between methods. A fitted head makes the loss read
the rows. Only the head learns: the encoder and the word embeddings (the tied decoder) stay frozen, so the head
maps the encoder's output into the source embedding space and knows nothing of any method's new rows. It is
fitted on English text that is not the check's corpus (e.g. the licence texts every Debian system ships in
/usr/share/common-licenses), so nothing of the held-out text leaks into it.

How: the text is tokenized with the source tokenizer into 128-token blocks framed by [CLS]/[SEP]; one tenth of the
blocks are kept for validation. Each block is masked twice (15 %, 80/10/10, seeded); the encoder runs once over
the masked blocks and its outputs at the masked positions are kept, then the head (transform dense + LayerNorm and
the output bias) is trained on them with Adam, full softmax over the source vocabulary, and the epoch with the
lowest validation loss is kept. Prints one JSON line: blocks, positions, the validation loss of the seeded head
the project would otherwise use and of the fitted one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 128
DRAWS = 2


def blocks_of(tokenizer, paths: list[Path]) -> torch.Tensor:
    ids: list[int] = []
    for path in paths:
        for paragraph in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            text = " ".join(paragraph.split())
            if text:
                ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    body = BLOCK - 2
    n = len(ids) // body
    rows = [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def features(model, tokenizer, blocks: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hyperofa_dist.models.mlm import encoder_of, mask_tokens

    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    encoder = encoder_of(model)
    hidden, labels = [], []
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for _ in range(DRAWS):
            inputs, target = mask_tokens(blocks, special, tokenizer.mask_token_id, len(tokenizer), generator)
            for start in range(0, len(blocks), 16):
                out = encoder(input_ids=inputs[start:start + 16]).last_hidden_state
                where = target[start:start + 16] >= 0
                hidden.append(out[where])
                labels.append(target[start:start + 16][where])
    return torch.cat(hidden), torch.cat(labels)


def head_loss(head, hidden: torch.Tensor, labels: torch.Tensor, batch: int = 2048) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            logits = head(hidden[start:start + batch])
            total += float(F.cross_entropy(logits, labels[start:start + batch], reduction="sum"))
    return total / len(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("text", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    from hyperofa_dist.formats.models import load_model_reporting_missing
    from hyperofa_dist.models.head import complete_head
    from hyperofa_dist.models.mlm import lm_head_of
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model, missing = load_model_reporting_missing(args.source, key="source.model")
    complete_head(model, missing, seed=args.seed)  # the project's seeded head: the starting point and the baseline
    model.eval()
    blocks = blocks_of(tokenizer, [Path(p) for p in args.text])
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, len(blocks) // 10)
    val_blocks, train_blocks = blocks[order[:n_val]], blocks[order[n_val:]]
    train_h, train_y = features(model, tokenizer, train_blocks, args.seed)
    val_h, val_y = features(model, tokenizer, val_blocks, args.seed + 1)
    head = lm_head_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for name, p in head.named_parameters() if "transform" in name or name.endswith("bias")
               and "decoder" not in name]
    trained = list({id(p): p for p in trained}.values())
    for p in trained:
        p.requires_grad_(True)
    seeded_loss = head_loss(head, val_h, val_y)
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    best, best_state, history = float("inf"), None, []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for start in range(0, len(perm), 512):
            idx = perm[start:start + 512]
            loss = F.cross_entropy(head(train_h[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = head_loss(head, val_h, val_y)
        history.append(round(val, 4))
        print(f"[fit_head] epoch {epoch}: validation loss {val:.4f}", file=sys.stderr, flush=True)
        if val < best:
            best, best_state = val, {id(p): p.detach().clone() for p in trained}
    with torch.no_grad():
        for p in trained:
            p.copy_(best_state[id(p)])
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(json.dumps({"blocks": {"train": len(train_blocks), "validation": len(val_blocks)},
                      "positions": {"train": len(train_y), "validation": len(val_y)},
                      "uniform_loss": round(float(np.log(len(tokenizer))), 4),
                      "validation_loss": {"seeded_head": round(seeded_loss, 4), "fitted_head": round(best, 4)},
                      "history": history, "trained_parameters": int(sum(p.numel() for p in trained))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
