"""`hyperofa bench mapping`: Ray postings builder vs the method's per-word `tokenizer.encode` loop, same words.

Generates >= 200,000 words in three scripts (the synthetic world, `iso:word` keys) and a SentencePiece-style
Unigram tokenizer of 32,000 pieces, builds the postings with Ray (`ray.num_cpus` workers, 2 by default) and
with the reference loop in this process, checks both give the same postings, and prints one JSON line.
`words_per_s` times the build from task submission to the merged CSR arrays, cold workers included (each
still imports the builder and loads and checks the tokenizer inside the timed build); Ray's own start-up,
including booting its worker processes (`ray.init` returns before they are up), is reported apart as
`ray_start_s`. Chunks are sized near `mapping.words_per_task` so that every worker gets the same number of
tasks (no worker idles through a short last round).
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

from .. import synthetic
from ..formats.tokenizer import TOKENIZER_JSON, load_tokenizer
from ..registry import resolve
from ..runtime.ray import ray_session, wait_for_workers

# The mapping stage's own builder and the method's per-word loop, from `data_prep` (resolved by name: the core
# package does not import the preparation package).
POSTINGS = "data_prep.mapping.postings"

N_CONCEPTS = 34_000  # x 6 languages = 204,000 words
VOCAB = 32_000
MAX_PIECE = 6


def make_unigram_tokenizer(words: list[str], vocab_size: int, out_dir: Path) -> Path:
    """An XLM-R-style Unigram tokenizer whose pieces are the most frequent word substrings, log-frequency scored.

    Built directly rather than EM-trained: the benchmark needs a realistic 32k-piece SentencePiece model, and
    training one on 200k words takes minutes on a small machine.
    """
    from transformers import XLMRobertaTokenizer

    counts: Counter = Counter()
    chars: set[str] = set()
    for word in words:
        text = "\u2581" + word
        chars.update(text)
        for i in range(len(text)):
            for j in range(i + 2, min(len(text), i + MAX_PIECE) + 1):
                counts[text[i:j]] += 1
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    budget = vocab_size - len(specials) - 1 - len(chars)  # <mask> is appended by the HF class
    chosen = [piece for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:budget]]
    total = sum(counts[p] for p in chosen) + len(chars)
    vocab = [(s, 0.0) for s in specials]
    vocab += [(p, math.log(counts[p] / total)) for p in chosen]
    vocab += [(c, math.log(1 / total) - 1.0) for c in sorted(chars)]
    tok = XLMRobertaTokenizer(vocab=vocab)
    tok.save_pretrained(out_dir)
    return out_dir


def balanced_words_per_task(n_words: int, workers: int, target: int) -> int:
    """Words per task near `target` giving a task count that is a multiple of `workers`."""
    rounds = max(1, round(n_words / (workers * target)))
    return math.ceil(n_words / (workers * rounds))


def run(config, args) -> int:
    build_postings = resolve(f"{POSTINGS}:build_postings")
    reference_postings = resolve(f"{POSTINGS}:reference_postings")
    csr_equals_lists = resolve(f"{POSTINGS}:csr_equals_lists")

    workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix="bench-mapping-"))
    world = synthetic.World(synthetic.default_languages(6), n_concepts=N_CONCEPTS, seed=config.run.seed)
    keys = [f"{lang.code[:3]}:{word}" for lang in world.languages for word in world.lexicon[lang.code]]
    tok_dir = workdir / f"unigram{VOCAB}-seed{config.run.seed}"
    if not (tok_dir / TOKENIZER_JSON).is_file():
        make_unigram_tokenizer([k[4:] for k in keys], VOCAB, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    workers = config.ray.num_cpus if not config.ray.address else None
    words_per_task = config.mapping.words_per_task
    if workers:
        words_per_task = balanced_words_per_task(len(keys), workers, words_per_task)

    started = time.perf_counter()
    with ray_session(config):
        if workers:
            wait_for_workers(workers)
        ray_start = time.perf_counter() - started
        started = time.perf_counter()
        [postings] = build_postings([tokenizer], keys, words_per_task)
        built = time.perf_counter() - started
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the baseline's lists exist

    started = time.perf_counter()
    reference = reference_postings(tokenizer, keys)
    baseline = time.perf_counter() - started
    result = {
        "bench": "mapping",
        "words": len(keys),
        "vocab": len(tokenizer),
        "workers": workers,
        "words_per_task": words_per_task,
        "words_per_s": round(len(keys) / built, 1),
        "baseline_words_per_s": round(len(keys) / baseline, 1),
        "speedup": round(baseline / built, 2),
        "identical": csr_equals_lists(postings, reference),
        "postings": int(postings.indptr[-1]),
        "driver_peak_rss_mib": round(peak_rss_mib, 1),
        "build_s": round(built, 2),
        "baseline_s": round(baseline, 2),
        "ray_start_s": round(ray_start, 2),
    }
    print(json.dumps(result))
    return 0 if result["identical"] else 1
