"""One trial of `tune hypernet`, in one process (a Ray Tune worker, or a test): no DeepSpeed launch.

The hypernetwork trains through the same `method.hypernet.loop` functions as the DeepSpeed job (one rank, a plain Adam
step), keeps its best weights by validation loss as the job does, and reports every epoch's losses. At its last
epoch (the budget, or `hypernet.early_stopping_patience`) the best weights predict the new tokens' coordinates,
init's assembly turns them into a HyperOFA-initialised model, and init's `new_token_loss` scores it on the held-out
text: the MLM loss at masked new-token positions (next-token loss for a causal source). That loss, not the
validation loss, is what the winner is chosen by.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import Config
from ..formats.mapping import Mapping, load_mapping
from ..formats.models import CAUSAL, Source, load_source
from ..formats.tokenizer import load_tokenizer, target_tokenizer_dir, tokenizer_fingerprint
from ..method import assemble as asm
from ..method.heldout import init_seed, new_token_loss
from ..method.hypernet import loop
from ..method.hypernet.data import TokenSet, WordTable, rank_batches
from ..method.hypernet.models import build_model
from ..method.hypernet.predict import predict_rows, tokens_to_predict
from ..method.hypernet.settings import augment_spec, context_rule, loss_spec, training_split
from ..method.ofa import ofa_rows_of
from ..method.random import column_stats
from ..models.export import build_expanded_any, merge_copy_pairs, special_token_pairs
from ..models.head import complete_head
from ..runtime.seeds import mix_seed

Report = Callable[[dict[str, Any]], None]
NEW_TOKEN_LOSS = "new_token_loss"


@dataclass
class Workspace:
    """What every trial reads, loaded once per process: the mapping's tables and splits, and the source model with
    the copy pairs the expanded model is assembled from."""

    config: Config
    mapping: Mapping
    table: WordTable
    train_set: TokenSet
    val_set: TokenSet
    new_ids: np.ndarray
    source: Source
    target_tok: Any
    target_fingerprint: dict[str, str]
    copy_t: np.ndarray
    copy_s: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    device: torch.device
    ofa: Optional[np.ndarray]  # OFA's rows of new_ids, when init combines HyperOFA's rows with them


def open_workspace(config: Config, device: torch.device) -> Workspace:
    mapping = load_mapping(config.run_dir)
    splits, _ = training_split(mapping)
    seed = config.run.seed
    coords = np.asarray(mapping.source_coordinates)
    context = context_rule(config.hypernet, seed, "source")
    source = load_source(config)
    if source.kind != CAUSAL:  # a headless source gets init's head, from the same seed, so the loss matches init's
        complete_head(source.model, source.missing, seed=seed, donor=config.source.mlm_head)
    target_dir = target_tokenizer_dir(config)
    target_tok = load_tokenizer(target_dir)
    special_t, special_s, _ = special_token_pairs(source.tokenizer, target_tok, f"target tokenizer {target_dir}",
                                                  source.kind)
    copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, special_t, special_s)
    mean, std = column_stats(mapping.source_coordinates)
    new_ids = tokens_to_predict(mapping.target_postings, mapping.overlap_target)
    combines = config.init.ofa_blend > 0 or config.init.ofa_centre  # a trial scores the rows init will make
    return Workspace(
        config=config, mapping=mapping, table=WordTable(mapping.word_vectors_path, device),
        train_set=TokenSet(splits["train"], mapping.source_postings, coords, mapping.k, context),
        val_set=TokenSet(splits["val"], mapping.source_postings, coords, mapping.k, context),
        new_ids=new_ids, source=source,
        target_tok=target_tok, target_fingerprint=tokenizer_fingerprint(target_dir), copy_t=copy_t, copy_s=copy_s,
        mean=mean, std=std, device=device, ofa=ofa_rows_of(mapping, config, new_ids) if combines else None,
    )


def hyperofa_loss(ws: Workspace, hp: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The step-0 new-token loss of the model HyperOFA initialises from this hypernetwork (init's assembly and
    init's loss; {} when the run has no held-out text for the target tokenizer)."""
    config, mapping = ws.config, ws.mapping
    target = TokenSet(ws.new_ids, mapping.target_postings, None, mapping.k,
                      context_rule(hp, config.run.seed, "target"))
    rows = predict_rows(model, ws.table, target, batch_size=hp.predict_batch_size, cap=hp.max_context,
                        device=ws.device)
    rows = asm.hyperofa_rows(ws.new_ids, rows, ws.ofa, config.init.ofa_blend, config.init.ofa_centre)
    assembly, _ = asm.method_coordinates(
        len(ws.target_tok), mapping.source_coordinates, ws.copy_t, ws.copy_s, ws.new_ids, rows, "hyperofa",
        ws.mean, ws.std, init_seed(config), config.init.recentre,
    )
    embeddings = asm.full_embeddings(assembly.coordinates, mapping.primitives)
    source = ws.source
    expanded, _ = build_expanded_any(
        source.model, source.tokenizer, ws.target_tok, embeddings, ws.copy_t, ws.copy_s,
        config.init.pad_to_multiple_of, causal=source.kind == CAUSAL, untied=source.untied,
    )
    return new_token_loss(config, expanded, ws.target_tok, ws.target_fingerprint, assembly.provenance, source.kind)


def run_trial(ws: Workspace, hp: Any, report: Report) -> dict[str, Any]:
    """Train with `hp` (a hypernet config section), calling `report` after every epoch with that epoch's losses;
    the last report also carries the new-token loss of the best weights. Returns the last report."""
    seed = ws.config.run.seed
    torch.manual_seed(seed)  # the initial weights the hypernet stage's ranks start from
    model = build_model(hp.model, word_dim=ws.mapping.word_dim, k=ws.mapping.k, num_layers=hp.num_layers,
                        hidden_size=hp.hidden_size, num_heads=hp.num_heads, dropout=hp.dropout).to(ws.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    torch.manual_seed(mix_seed(seed, "dropout", 0))

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    best: Optional[float] = None
    best_epoch, since_best, best_state = -1, 0, None
    row: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(hp.epochs):
        lr = loop.lr_at(epoch, hp.lr, hp.lr_decay, hp.lr_decay_every)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = rank_batches(ws.train_set.lengths, batch_size=hp.batch_size, world_size=1, rank=0, seed=seed,
                               epoch=epoch, group_factor=hp.group_factor, multiple_of=1)
        model.train()
        sums = loop.train_epoch(model, update, ws.table, ws.train_set, batches, seed=seed, epoch=epoch, rank=0,
                                cap=hp.max_context, augment=augment_spec(hp), loss=loss_spec(hp), device=ws.device)
        model.eval()
        val = loop.evaluate(model, ws.table, ws.val_set, batch_size=hp.batch_size, world_size=1, rank=0,
                            cap=hp.max_context, loss=loss_spec(hp), device=ws.device)
        row = {"epoch": epoch, **loop.means(sums, loop.TRAIN_KEYS, "train_"), **loop.means(val, loop.EVAL_KEYS, "val_")}
        # A NaN validation loss never becomes the best (a comparison with NaN is false), so it cannot win.
        if best is None or row["val_loss"] < best:
            best, best_epoch, since_best = row["val_loss"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        row.update(best_val_loss=best if best is not None else math.nan, best_epoch=best_epoch)
        patience = hp.early_stopping_patience
        if epoch == hp.epochs - 1 or (patience is not None and since_best >= patience):
            break
        report(row)
    if best_state is not None:
        model.load_state_dict(best_state)
        found = hyperofa_loss(ws, hp, model).get("loss", {})
        row[NEW_TOKEN_LOSS] = float(found.get("average", math.nan))
    else:
        row[NEW_TOKEN_LOSS] = math.nan
    row["seconds"] = time.perf_counter() - start
    report(row)
    return row
