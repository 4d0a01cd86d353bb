"""`hyperofa bench untied`: an untied causal LM has two matrices with a row per token, E_in (input embeddings) and
E_out (output projection). Does one factorisation of [E_in | E_out] with one hypernetwork predict held-out rows of
both as well as two factorisations with a hypernetwork each? (docs/METHOD.md §8)

On the demo's generated world with a causal source (a tiny untied Llama with a Llama-3-style tokenizer, pretrained
with the next-token loss; `synthetic.demo.CausalWorldSpec`), the tokenizer, vectors and mapping stages run once;
the source tokens with words are then split 80/10/10 per seed, and each variant's hypernetworks (the demo's
BiLSTM, trained in this process, the best epoch by validation loss kept) predict the test tokens:

    joint        one factorisation of [E_in | E_out] (each scaled to unit row norm), rank k, one hypernetwork
    joint_2k     the same at rank 2k (the coordinate budget of `separate`)
    separate     E_in and E_out factorised apart, rank k each, one hypernetwork per matrix
    separate_1hn E_in and E_out factorised apart, one hypernetwork predicting both (2k outputs)

OFA (its neighbours and weights come from the word vectors alone, so one set of weights serves both matrices)
is reported for `joint` and `separate` too. The figure is the mean cosine between the predicted and the true
full-rank rows of E_in and of E_out over the test tokens, per seed and on average; `reconstruction` is the cosine
the factorisation alone reaches (the true coordinates times P), the ceiling of each variant. Prints one JSON line.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEMO_CONFIG, load_config
from ..factorize import factorize
from ..formats.mapping import load_mapping
from ..registry import command
from ..synthetic.demo import CausalWorldSpec, build_world
from ..tracking import NullTracker

SEEDS = (0, 1, 2)
SPLIT = (0.8, 0.1, 0.1)
# The demo's hypernetwork, with a shorter word list per token so that the bench runs in minutes on 2 cores.
PROFILE = ("hypernet.max_context=32", "hypernet.epochs=20")


def _mean_cosine(pred: np.ndarray, true: np.ndarray) -> float:
    from ..method.assemble import mean_cosine

    return round(mean_cosine(pred, true), 4)


def train_hypernet(mapping: Any, hp: Any, split: dict[str, np.ndarray], targets: np.ndarray, seed: int) -> np.ndarray:
    """A hypernetwork trained in this process on `targets` (rows per source token) for the train split, the epoch
    with the lowest validation loss kept; its predictions for the test split."""
    import torch

    from ..method.hypernet import loop
    from ..method.hypernet.data import TokenSet, WordTable, rank_batches
    from ..method.hypernet.predict import predict_rows
    from ..method.hypernet.settings import augment_spec, loss_spec
    from .hypernet import plain_training

    k = targets.shape[1]
    table = WordTable(mapping.word_vectors_path)
    sets = {part: TokenSet(ids, mapping.source_postings, targets, k) for part, ids in split.items()}
    model, optimizer, update = plain_training(hp, mapping.word_dim, k, seed)
    cpu = torch.device("cpu")
    best, best_state = float("inf"), None
    for epoch in range(hp.epochs):
        for group in optimizer.param_groups:
            group["lr"] = loop.lr_at(epoch, hp.lr, hp.lr_decay, hp.lr_decay_every)
        batches = rank_batches(sets["train"].lengths, batch_size=hp.batch_size, world_size=1, rank=0, seed=seed,
                               epoch=epoch, group_factor=hp.group_factor)
        model.train()
        loop.train_epoch(model, update, table, sets["train"], batches, seed=seed, epoch=epoch, rank=0,
                         cap=hp.max_context, augment=augment_spec(hp), loss=loss_spec(hp), device=cpu)
        model.eval()
        sums = loop.evaluate(model, table, sets["val"], batch_size=hp.batch_size, world_size=1, rank=0,
                             cap=hp.max_context, loss=loss_spec(hp), device=cpu)
        val = loop.means(sums, loop.EVAL_KEYS, "")["loss"]
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return predict_rows(model, table, sets["test"], batch_size=hp.predict_batch_size, cap=hp.max_context, device=cpu)


def _ofa(mapping: Any, config: Any, coordinates: np.ndarray, test: np.ndarray) -> np.ndarray:
    from ..method.ofa import ofa_for_tokens, ofa_settings

    return ofa_for_tokens(mapping.source_postings, mapping.source_postings, mapping.word_vectors, coordinates, test,
                          exclude_sources=test, **ofa_settings(config))


def _split(mapping: Any, seed: int) -> dict[str, np.ndarray]:
    """The mapping's trainable source tokens (covered, specials excluded) split SPLIT with `seed`."""
    from ..registry import resolve

    split_tokens = resolve("data_prep.mapping.split:split_tokens")  # the core never imports data_prep statically
    return split_tokens(np.concatenate(list(mapping.split.values())), list(SPLIT), seed)


def variants(mapping: Any, config: Any, e_in: np.ndarray, e_out: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    hp = config.hypernet
    k = config.mapping.num_primitives
    d = e_in.shape[1]
    split = _split(mapping, seed)
    test = split["test"]
    truth = {"in": e_in[test], "out": e_out[test]}
    out: dict[str, dict[str, float]] = {}

    def score(name: str, pred_in: np.ndarray, pred_out: np.ndarray) -> None:
        out[name] = {"in": _mean_cosine(pred_in, truth["in"]), "out": _mean_cosine(pred_out, truth["out"])}
        print(f"[bench untied] seed {seed} {name}: {out[name]}", file=sys.stderr, flush=True)

    both = np.concatenate([e_in, e_out], axis=1)
    for name, rank in (("joint", k), ("joint_2k", 2 * k)):
        f = factorize(both, rank, blocks=2)
        p = f.primitives.astype(np.float64)
        score(f"{name}/reconstruction", f.coordinates[test] @ p[:, :d], f.coordinates[test] @ p[:, d:])
        rows = train_hypernet(mapping, hp, split, f.coordinates, seed)
        score(f"{name}/hyperofa", rows @ p[:, :d], rows @ p[:, d:])
        if name == "joint":
            rows = _ofa(mapping, config, f.coordinates, test)
            score(f"{name}/ofa", rows @ p[:, :d], rows @ p[:, d:])
    f_in, f_out = factorize(e_in, k), factorize(e_out, k)
    p_in, p_out = f_in.primitives.astype(np.float64), f_out.primitives.astype(np.float64)
    score("separate/reconstruction", f_in.coordinates[test] @ p_in, f_out.coordinates[test] @ p_out)
    rows_in = train_hypernet(mapping, hp, split, f_in.coordinates, seed)
    rows_out = train_hypernet(mapping, hp, split, f_out.coordinates, seed)
    score("separate/hyperofa", rows_in @ p_in, rows_out @ p_out)
    joined = np.concatenate([f_in.coordinates, f_out.coordinates], axis=1)
    rows = train_hypernet(mapping, hp, split, joined, seed)
    score("separate_1hn/hyperofa", rows[:, :k] @ p_in, rows[:, k:] @ p_out)
    score("separate/ofa", _ofa(mapping, config, f_in.coordinates, test) @ p_in,
          _ofa(mapping, config, f_out.coordinates, test) @ p_out)
    return out


def run(config: Any, args: Any) -> int:
    import torch

    from ..formats.models import load_model

    torch.set_num_threads(1)
    keep = getattr(args, "workdir", None)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hyperofa-bench-untied-"))
    overrides = [*PROFILE, *getattr(args, "overrides", []), "tracking.enabled=false"]
    base = load_config(DEMO_CONFIG, overrides)
    spec = CausalWorldSpec(seed=0, block_size=base.prepare.block_size, pretrain_steps=300)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        world = build_world(root / "world", spec)
        run_dir = root / "run"
        config = load_config(DEMO_CONFIG, [
            *overrides, f"run.dir={run_dir}", f"source.model={world.source_model}", f"corpus.path={world.corpus}",
        ])
        for name in ("tokenizer", "vectors", "mapping"):
            command(name).load()(config, NullTracker())
        mapping = load_mapping(run_dir)
        model = load_model(world.source_model, "AutoModelForCausalLM")
        rows = mapping.source_vocab
        e_in = model.get_input_embeddings().weight.detach().double().numpy()[:rows]
        e_out = model.get_output_embeddings().weight.detach().double().numpy()[:rows]
        for seed in SEEDS:
            results[str(seed)] = variants(mapping, config, e_in, e_out, seed)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    names = list(results[str(SEEDS[0])])
    mean = {name: {side: round(float(np.mean([results[s][name][side] for s in results])), 4) for side in ("in", "out")}
            for name in names}
    print(json.dumps({
        "bench": "untied", "k": base.mapping.num_primitives, "D": spec.hidden_size, "seeds": list(SEEDS),
        "split": list(SPLIT), "test_tokens": int(len(_split(mapping, SEEDS[0])["test"])),
        "hypernet": {"model": base.hypernet.model, "hidden_size": base.hypernet.hidden_size,
                     "epochs": base.hypernet.epochs, "max_context": base.hypernet.max_context},
        "per_seed": results, "mean": mean,
    }))
    return 0
