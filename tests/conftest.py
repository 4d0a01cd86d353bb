"""Shared fixtures: a generated multilingual world, corpora, source tokenizers, and builders of each stage's inputs
(all made here, none downloaded). Test modules never import each other: what several of them need lives here.

Builders that write an on-disk format go through that format's own writer (`hyperofa_dist.formats`), so a test
input is what the stage that owns the format would have written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from hyperofa_dist import synthetic  # noqa: E402
from hyperofa_dist.config import Config, load_config  # noqa: E402
from hyperofa_dist.formats.rundir import Stage  # noqa: E402


# --- the generated world ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def world() -> synthetic.World:
    return synthetic.World(synthetic.default_languages(6), n_concepts=3000, seed=0)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, world) -> Path:
    """6 languages, 3 scripts (Latn, Cyrl, Grek), skewed sizes, one gzipped file; line i parallel across files."""
    root = tmp_path_factory.mktemp("corpus")
    sizes = synthetic.skewed_sizes(world.languages, largest=3000, ratio=0.4)
    synthetic.write_corpus(root, world, sizes, seed=0, gzip_languages=["qab_Cyrl"])
    return root


@pytest.fixture(scope="session")
def source_tokenizers(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """One HF-format source tokenizer per family, trained on the first language only (the 'source language')."""
    root = tmp_path_factory.mktemp("source_tok")
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    return {fam: synthetic.train_source_tokenizer(fam, texts, 400, root / fam) for fam in synthetic.FAMILIES}


@pytest.fixture(scope="session")
def causal_tokenizers(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """A Llama-3-style (byte-level BPE, special tokens after it) and a Llama-2-style (SentencePiece BPE with byte
    fallback) source tokenizer, trained like `source_tokenizers` on the first language only."""
    root = tmp_path_factory.mktemp("causal_tok")
    texts = synthetic.read_lines(small_corpus / "qaa_Latn.txt")
    return {kind: synthetic.train_source_tokenizer(kind, texts, 400, root / kind)
            for kind in synthetic.CAUSAL_TOKENIZER_FAMILIES}


@pytest.fixture(scope="session")
def trained_vectors(tmp_path_factory, small_corpus) -> Path:
    """Cross-lingual `iso:word` vectors trained here by `hyperofa vectors train` on the parallel small_corpus (its
    skewed files are prefixes of one aligned corpus, hence prefix_aligned)."""
    from hyperofa_dist import cli

    run_dir = tmp_path_factory.mktemp("vectors_run")
    argv = ["vectors", "train", f"run.dir={run_dir}", f"vectors.train.corpus={small_corpus}", "tracking.enabled=false",
            "vectors.train.dim=48", "vectors.train.epochs=10", "vectors.train.alpha=0.25", "vectors.train.prefix_aligned=true"]
    from hyperofa_dist.formats.vectors import trained_vectors_path

    assert cli.main(argv) == 0
    return trained_vectors_path(run_dir)


# --- small helpers ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models: a second torch thread only adds contention on the shared 2-core machine (seconds per step)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_one_line_error(out: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """`hyperofa <command>` failed with status 2 and a single `error:` line holding every needle."""
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hyperofa {command}: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error():
    """The project's promise for bad input, checked one way: exit 2 and one stderr line naming the problem."""
    return _assert_one_line_error


# --- prepare-format shards ----------------------------------------------------------------------------------------


def framed_blocks(tokenizer: Any, lines: list[str], block_size: int) -> np.ndarray:
    """Blocks as prepare packs them: the sentences' ids each followed by the separator, cut into `<s> ... </s>`."""
    from data_prep.prepare.packing import Specials, flatten_ids, pack_sentences
    from hyperofa_dist.formats.tokenizer import frame_ids

    flat, offsets = flatten_ids(tokenizer(lines, add_special_tokens=False)["input_ids"])
    cls, sep = frame_ids(tokenizer, "fixture tokenizer")  # <s>/</s>, [CLS]/[SEP], or a causal LM's bos/eos
    specials = Specials(cls=cls, sep=sep)
    return pack_sentences(flat, offsets, np.arange(len(lines)), block_size, specials).blocks


def write_prepare_dir(
    out: Path, blocks: dict[str, dict[str, np.ndarray]], tokenizer_dir: Optional[Path], block_size: int,
    blocks_per_sample: int = 4, samples_per_shard: int = 4, manifest: bool = True,
) -> Path:
    """A prepare directory from {lang: {split: blocks}}: shards by the shard format's writer, and a manifest."""
    from hyperofa_dist.formats.shards import build_shards, write_shard
    from hyperofa_dist.formats.tokenizer import tokenizer_fingerprint

    listed = []
    for lang, splits in sorted(blocks.items()):
        for split, part in splits.items():
            for shard in build_shards(part, lang, 0, blocks_per_sample, samples_per_shard):
                write_shard(out / split / shard.name, shard.data, keep_existing=False)
                listed.append({"path": f"{split}/{shard.name}", "split": split, "lang": lang, "blocks": shard.blocks})
    if manifest:
        stage = Stage(out.parent, out.name)
        stage.begin("fixture")
        inputs = {"tokenizer": tokenizer_fingerprint(tokenizer_dir)} if tokenizer_dir else {}
        stage.write_manifest(config={}, inputs=inputs, outputs=[], extra={"shards": listed, "block_size": block_size})
    return out


@pytest.fixture(scope="session")
def prepare_format():
    """`framed_blocks(tokenizer, lines, block_size)` and `write(out, {lang: {split: blocks}}, tokenizer_dir, ...)`."""

    @dataclass(frozen=True)
    class PrepareFormat:
        framed_blocks = staticmethod(framed_blocks)
        write = staticmethod(write_prepare_dir)

    return PrepareFormat()


# --- init: a tiny source model, a target tokenizer over all languages, a mapping directory ------------------------


@dataclass
class InitWorld:
    run_dir: Path
    source_model: Path
    target_tokenizer: Path
    vectors: Path
    family: str
    k: int
    hidden: int

    def overrides(self, *extra: str) -> list[str]:
        return [
            f"run.dir={self.run_dir}",
            f"source.model={self.source_model}",
            f"tokenizer.path={self.target_tokenizer}",
            "tracking.enabled=false",
            *extra,
        ]


@dataclass
class Exported:
    source: Any
    source_tok: Any
    target_tok: Any
    mapping: Any
    copy_t: np.ndarray
    copy_s: np.ndarray
    coordinates: np.ndarray
    model: Any
    info: Any


def word_table(world: synthetic.World, n_concepts: int = 250, dim: int = 16, seed: int = 0):
    """(keys 'iso:word', float32 vectors [n, dim]) for the first n_concepts concepts of every language.

    Cross-lingual by construction: every word's vector is its concept's vector plus a little noise, so
    translations are near each other, as ColexNet+ vectors are."""
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((n_concepts, dim))
    keys, rows = [], []
    for lang in world.languages:
        for c in range(n_concepts):
            keys.append(f"{lang.code[:3]}:{world.lexicon[lang.code][c]}")  # ColexNet+-style iso:word
            rows.append(concepts[c] + 0.3 * rng.standard_normal(dim))
    return keys, np.asarray(rows, dtype=np.float32)


def write_init_mapping(run_dir: Path, source_model: Path, target_tokenizer: Path, world: synthetic.World,
                       k: Optional[int] = None, seed: int = 0) -> tuple[Path, int]:
    """`<run_dir>/mapping/` for this source model and target tokenizer, built with the mapping stage's own
    functions (overlap, factorisation, postings, split) and written by the mapping format's writer; only Ray is
    left out. Returns (the word-vector file it records, k)."""
    import torch

    from data_prep.mapping.postings import backend_encoder, build_local
    from data_prep.mapping.split import split_tokens
    from hyperofa_dist.factorize import factorize
    from hyperofa_dist.formats.files import fingerprint_path, save_npy
    from hyperofa_dist.formats.mapping import MappingParts, Postings, stage_of, write_mapping
    from hyperofa_dist.formats.models import AUTO_CLASS, CAUSAL, load_model, model_kind_of, source_identity, tied_output
    from hyperofa_dist.formats.tokenizer import backend_json, load_tokenizer, tokenizer_fingerprint
    from hyperofa_dist.vocab import compute_overlap, special_ids

    kind = model_kind_of(source_model)
    model = load_model(source_model, AUTO_CLASS[kind])
    s_tok, t_tok = load_tokenizer(source_model), load_tokenizer(target_tokenizer)
    with torch.no_grad():
        e_s = model.get_input_embeddings().weight.detach().numpy()[: len(s_tok)].copy()
        matrices = 1
        if kind == CAUSAL and not tied_output(model):  # an untied causal LM: [E_in | E_out], as the stage does
            e_s = np.concatenate([e_s, model.get_output_embeddings().weight.detach().numpy()[: len(s_tok)]], axis=1)
            matrices = 2
    k = e_s.shape[1] if k is None else k
    keys, vectors = word_table(world, seed=seed)
    vectors_file = save_npy(run_dir / "vectors.npy", vectors)  # the "file" the mapping records a fingerprint of

    def postings(tok) -> Postings:
        return build_local(backend_encoder(backend_json(tok)), keys, len(tok), 4096)

    source, target = postings(s_tok), postings(t_tok)
    factors = factorize(e_s, k, blocks=matrices)
    overlap = compute_overlap(t_tok, s_tok)
    covered = source.covered()
    trainable = covered[~np.isin(covered, sorted(special_ids(s_tok)))]
    parts = MappingParts(
        source_postings=source, target_postings=target, overlap_target=overlap.target_ids,
        overlap_source=overlap.source_ids, overlap_kinds=overlap.kinds,
        split=split_tokens(trainable, [0.8, 0.1, 0.1], seed), coordinates=factors.coordinates,
        primitives=factors.primitives, words=keys,
        stats={"source_covered": int(len(covered)), "target_covered": int(len(target.covered()))},
    )
    stage = stage_of(run_dir)
    stage.begin("fixture")
    outputs = write_mapping(stage.path, parts, [vectors], vectors.shape[1], vectors_file)
    inputs = {
        "vectors": {"path": str(vectors_file), "fingerprint": fingerprint_path(vectors_file)},
        "source": source_identity(load_config(None, [f"source.model={source_model}"])),
        "target_tokenizer": tokenizer_fingerprint(target_tokenizer),
        "k": k,
    }
    counts = {"V_s": len(s_tok), "V_t": len(t_tok), "D": e_s.shape[1] // matrices, "matrices": matrices, "k": k,
              "n_words": len(keys), "word_dim": vectors.shape[1]}
    stage.write_manifest(config={}, inputs=inputs, outputs=outputs, counts=counts,
                         extra={"factorized": k != e_s.shape[1]})
    return vectors_file, k


class InitWorlds:
    """One init world per (family, k, target vocabulary) for the whole session: building one costs seconds and
    tests only read it (tests that write under a run dir take `fresh_run`)."""

    def __init__(self, tmp_path_factory, source_tokenizers, small_corpus, world, causal_tokenizers=None):
        self.tmp_path_factory, self.source_tokenizers = tmp_path_factory, source_tokenizers
        self.corpus, self.world = small_corpus, world
        self.causal_tokenizers = causal_tokenizers  # built on first use
        self.cache: dict[tuple, InitWorld] = {}

    def causal(self, family: str, tokenizer: str = "llama3", k: Optional[int] = None, new_tokens: int = 300) -> InitWorld:
        """A tiny causal LM (`family` llama: untied, qwen2: tied) with a `tokenizer`-kind source tokenizer, the
        target tokenizer `hyperofa tokenizer` would extend it to on every language, and its mapping."""
        key = ("causal", family, tokenizer, k, new_tokens)
        if key not in self.cache:
            from tokenizers import Tokenizer

            from hyperofa_dist.tokenizer.build import save_hf, special_roles
            from hyperofa_dist.tokenizer.learn import extend
            from transformers import AutoTokenizer

            source_tok = self.causal_tokenizers()[tokenizer]
            root = self.tmp_path_factory.mktemp(f"init_{family}_{tokenizer}_{k}")
            source_model = synthetic.make_tiny_model(family, source_tok, root / "source_model", hidden_size=32)
            texts = [line for path in sorted(self.corpus.iterdir()) for line in synthetic.read_lines(path, limit=400)]
            backend = Tokenizer.from_file(str(source_tok / "tokenizer.json"))
            target = root / "target_tokenizer"
            target.mkdir()
            roles = special_roles(AutoTokenizer.from_pretrained(str(source_tok)))
            save_hf(extend(backend, texts, new_tokens).tokenizer, roles, 512, target)
            vectors, k_used = write_init_mapping(root / "run", source_model, target, self.world, k=k)
            self.cache[key] = InitWorld(root / "run", source_model, target, vectors, family, k_used, 32)
        return self.cache[key]

    def get(self, family: str, k: Optional[int] = None, target_vocab: int = 900,
            tokenizer: Optional[str] = None) -> InitWorld:
        """A tiny masked LM of `family` with a `tokenizer`-kind source tokenizer (default: the family's own), a
        target tokenizer of that kind over every language, and its mapping."""
        tokenizer = tokenizer or family
        key = (family, k, target_vocab, tokenizer)
        if key not in self.cache:
            root = self.tmp_path_factory.mktemp(f"init_{family}_{k}")
            source_model = synthetic.make_tiny_model(
                family, self.source_tokenizers[tokenizer], root / "source_model", hidden_size=32
            )
            texts = [line for path in sorted(self.corpus.iterdir()) for line in synthetic.read_lines(path, limit=400)]
            target = synthetic.train_source_tokenizer(tokenizer, texts, target_vocab, root / "target_tokenizer")
            vectors, k_used = write_init_mapping(root / "run", source_model, target, self.world, k=k)
            self.cache[key] = InitWorld(root / "run", source_model, target, vectors, family, k_used, 32)
        return self.cache[key]

    def headless(self, family: str, k: Optional[int] = None) -> InitWorld:
        """A world whose source model is `get(family, k)`'s encoder saved without its MLM head, as a
        sentence-embedding model is published (AutoModel weights plus the tokenizer), with its own mapping."""
        key = ("headless", family, k)
        if key not in self.cache:
            from transformers import AutoModel

            from hyperofa_dist.formats.models import quiet_transformers
            from hyperofa_dist.formats.tokenizer import load_tokenizer

            base = self.get(family, k)
            root = self.tmp_path_factory.mktemp(f"headless_{family}_{k}")
            with quiet_transformers():
                AutoModel.from_pretrained(str(base.source_model)).save_pretrained(root / "source_model")
            load_tokenizer(base.source_model).save_pretrained(root / "source_model")
            vectors, k_used = write_init_mapping(root / "run", root / "source_model", base.target_tokenizer,
                                                 self.world, k=k)
            self.cache[key] = InitWorld(root / "run", root / "source_model", base.target_tokenizer, vectors, family,
                                        k_used, base.hidden)
        return self.cache[key]

    @staticmethod
    def fresh_run(base: InitWorld, run_dir: Path) -> InitWorld:
        """A copy of a world's run directory (mapping only) that a test may extend or break."""
        shutil.copytree(base.run_dir / "mapping", run_dir / "mapping")
        return InitWorld(run_dir, base.source_model, base.target_tokenizer, base.vectors, base.family, base.k,
                         base.hidden)

    @staticmethod
    def write_hypernet(run_dir: Path, ids, rows, test_ids=None, test_rows=None) -> None:
        """A hypernet stage output as the init stage reads it, through the hypernet format's writers."""
        from hyperofa_dist.formats import hypernet as fmt

        stage = fmt.stage_of(run_dir)
        stage.begin("fixture")
        fmt.write_predictions(stage.path, np.asarray(ids), np.asarray(rows))
        names = [fmt.PREDICTED_IDS, fmt.PREDICTED_ROWS]
        if test_ids is not None:
            fmt.write_test_predictions(stage.path, np.asarray(test_ids), np.asarray(test_rows), {})
            names += [fmt.TEST_IDS, fmt.TEST_ROWS]
        stage.write_manifest(config={}, inputs={"fixture": True}, outputs=names)

    @staticmethod
    def hyperofa_predictions(run_dir, seed: int = 0) -> int:
        """The hypernet stage's predictions for `run_dir`'s mapping, made by its own inference code with a seeded,
        untrained BiLSTM (training is the hypernet stage's business and is tested there)."""
        import torch

        from hyperofa_dist.formats import hypernet as fmt
        from hyperofa_dist.formats.mapping import load_mapping
        from hyperofa_dist.method.hypernet.data import WordTable
        from hyperofa_dist.method.hypernet.models import build_model
        from hyperofa_dist.method.hypernet.predict import predict_all

        mapping = load_mapping(run_dir)
        torch.manual_seed(seed)
        model = build_model("bilstm", word_dim=mapping.word_dim, k=mapping.k, num_layers=1, hidden_size=16,
                            num_heads=1, dropout=0.0)
        stage = fmt.stage_of(run_dir)
        stage.begin("test")
        metrics = predict_all(
            model, WordTable(mapping.word_vectors_path), source=mapping.source_postings, target=mapping.target_postings,
            coordinates=np.asarray(mapping.source_coordinates), copied=mapping.overlap_target,
            test_ids=mapping.split["test"], out_dir=stage.path, batch_size=64, cap=32, device=torch.device("cpu"),
        )
        stage.write_manifest(config={}, inputs={"test": seed},
                             outputs=[fmt.PREDICTED_IDS, fmt.PREDICTED_ROWS, fmt.TEST_IDS, fmt.TEST_ROWS])
        return metrics["predicted_count"]

    @staticmethod
    def export_copy_random(w: InitWorld, out_dir: Path, pad: Optional[int] = None, seed: int = 0) -> Exported:
        """Assemble F_t from copies and random rows only and export the expanded model of `w` into out_dir."""
        from hyperofa_dist.formats.mapping import load_mapping
        from hyperofa_dist.formats.models import load_model, save_model_dir
        from hyperofa_dist.formats.tokenizer import load_tokenizer
        from hyperofa_dist.method import assemble as asm
        from hyperofa_dist.models.export import build_expanded_model, merge_copy_pairs, special_token_pairs
        from hyperofa_dist.method.random import column_stats

        source = load_model(w.source_model)
        s_tok, t_tok = load_tokenizer(w.source_model), load_tokenizer(w.target_tokenizer)
        mapping = load_mapping(w.run_dir)
        st, ss, _ = special_token_pairs(s_tok, t_tok)
        copy_t, copy_s = merge_copy_pairs(mapping.overlap_target, mapping.overlap_source, st, ss)
        mean, std = column_stats(mapping.source_coordinates)
        a = asm.assemble_coordinates(len(t_tok), mapping.source_coordinates, copy_t, copy_s, None, None, None, mean,
                                     std, seed)
        e_t = asm.full_embeddings(a.coordinates, mapping.primitives)
        model, info = build_expanded_model(source, s_tok, t_tok, e_t, copy_t, copy_s, pad_to_multiple_of=pad)
        save_model_dir(model, t_tok, out_dir)
        return Exported(source, s_tok, t_tok, mapping, copy_t, copy_s, a.coordinates, model, info)


@pytest.fixture(scope="session")
def init_worlds(request, tmp_path_factory, source_tokenizers, small_corpus, world) -> InitWorlds:
    return InitWorlds(tmp_path_factory, source_tokenizers, small_corpus, world,
                      causal_tokenizers=lambda: request.getfixturevalue("causal_tokenizers"))


# --- hypernet: a generated mapping whose targets are learnable, and a config that trains on it in seconds --------


class HypernetKit:
    # Small enough to train in seconds on one core, large enough that a broken pipeline cannot reach cosine 0.9.
    SMALL = dict(n_words=3000, word_dim=16, v_source=1200, v_target=1600, k=8)

    def mapping(self, run_dir: Path, **sizes):
        from hyperofa_dist.synthetic.mapping import make_mapping

        return make_mapping(run_dir, **{**self.SMALL, **sizes})

    @staticmethod
    def overrides(m, *extra: str) -> list[str]:
        return [
            f"run.dir={m.run_dir}",
            f"vectors.path={m.vectors_file}",
            f"mapping.num_primitives={m.k}",
            "tracking.enabled=false",
            "hypernet.num_layers=1",
            "hypernet.hidden_size=32",
            "hypernet.dropout=0.1",
            "hypernet.batch_size=32",
            "hypernet.lr=0.003",
            "hypernet.epochs=4",
            "hypernet.threads_per_rank=1",
            *extra,
        ]

    def config(self, m, *extra: str) -> Config:
        return load_config(None, self.overrides(m, *extra))


@pytest.fixture(scope="session")
def hypernet_kit() -> HypernetKit:
    return HypernetKit()


# --- pretrain: a target tokenizer over all languages, a tiny expanded model laid out like init's output, shards ---


class PretrainKit:
    BLOCK = 32
    COPIED = 300  # rows [0, COPIED) play the tokens copied from the source model

    def tokenizer_and_model(self, root: Path, corpus: Path, vocab: int = 500, seed: int = 0) -> tuple[Path, Path]:
        """(tokenizer dir, model dir) with the model at <root>/init/hyperofa/model and a provenance beside it."""
        from hyperofa_dist.formats import init as init_format

        texts = [line for f in sorted(corpus.iterdir()) for line in synthetic.read_lines(f, 400)]
        tok = synthetic.train_source_tokenizer("xlmr", texts, vocab, root / f"tok{seed}")
        model = synthetic.make_tiny_model(
            "xlmr", tok, init_format.model_dir(root, "hyperofa"), max_position=self.BLOCK + 8, seed=seed
        )
        self._provenance(model)
        return tok, model

    def causal_tokenizer(self, root: Path, corpus: Path, kind: str = "llama3", vocab: int = 500) -> Path:
        """A causal target tokenizer (llama3: byte-level BPE; llama2: SentencePiece BPE with byte fallback) over
        every language of the corpus."""
        texts = [line for f in sorted(corpus.iterdir()) for line in synthetic.read_lines(f, 400)]
        return synthetic.train_source_tokenizer(kind, texts, vocab, root / f"ctok-{kind}")

    def causal_model(self, root: Path, tok: Path, family: str = "llama", seed: int = 0) -> Path:
        """A tiny causal LM at <root>/init/hyperofa/model with a provenance beside it: llama (untied), qwen2 (tied;
        a qwen2-kind tokenizer, since AutoTokenizer loads any tokenizer beside a qwen2 config as Qwen2Tokenizer), or
        llama-tied (a Llama with tied embeddings, as Llama 3.2 1B/3B have them)."""
        import shutil

        from hyperofa_dist.formats import init as init_format

        out = init_format.model_dir(root, "hyperofa")
        model = synthetic.make_tiny_model(
            "llama" if family == "llama-tied" else family, tok, out, max_position=self.BLOCK + 8, seed=seed
        )
        if family == "llama-tied":
            import torch
            from transformers import AutoConfig, LlamaForCausalLM

            config = AutoConfig.from_pretrained(out)
            config.tie_word_embeddings = True
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(out)
        # The tokenizer files byte for byte as the tokenizer stage wrote them (the shards record their sha256).
        for path in tok.iterdir():
            if path.is_file():
                shutil.copy2(path, model / path.name)
        self._provenance(model)
        return model

    def _provenance(self, model: Path) -> None:
        from hyperofa_dist.formats import init as init_format
        from hyperofa_dist.formats.files import save_npy
        from hyperofa_dist.formats.models import read_model_config

        provenance = np.full(read_model_config(model)["vocab_size"], 3, dtype=np.uint8)
        provenance[: self.COPIED] = 0
        save_npy(model.parent / init_format.PROVENANCE, provenance)

    def factorised_model(self, root: Path, model: Path, k: int = 8) -> Path:
        """A copy of `model` at <root>/init/hyperofa/model whose word embeddings are exactly F_t P of rank k (the
        product taken as the init stage takes it), with F_t.npy, P.npy and the provenance beside it."""
        import shutil

        import torch

        from hyperofa_dist.factorize import factorize
        from hyperofa_dist.formats import init as init_format
        from hyperofa_dist.formats.models import load_model
        from hyperofa_dist.method.assemble import full_embeddings

        net = load_model(model)
        factors = factorize(net.get_input_embeddings().weight.detach().numpy(), k)
        with torch.no_grad():
            net.get_input_embeddings().weight.copy_(
                torch.from_numpy(full_embeddings(factors.coordinates, factors.primitives)))
        out = init_format.model_dir(root, "hyperofa")
        shutil.copytree(model, out)  # the tokenizer files byte for byte: shards record their sha256
        net.save_pretrained(out)
        init_format.save_factors(out.parent, factors.coordinates, factors.primitives)
        if (model.parent / init_format.PROVENANCE).is_file():
            shutil.copy(model.parent / init_format.PROVENANCE, out.parent / init_format.PROVENANCE)
        return out

    def real_prepare(self, run_dir: Path, corpus: Path, tok: Path) -> Path:
        """`hyperofa prepare` (Ray, one CPU) into <run_dir>/prepare with small shards so languages have several."""
        from data_prep.prepare.stage import run
        from hyperofa_dist.tracking import NullTracker

        config = load_config(None, [
            f"run.dir={run_dir}", f"corpus.path={corpus}", f"tokenizer.path={tok}", f"prepare.block_size={self.BLOCK}",
            "prepare.blocks_per_sample=4", "prepare.samples_per_shard=8", "prepare.heldout_fraction=0.05",
            "ray.num_cpus=1", "tracking.enabled=false",
        ])
        assert run(config, NullTracker()) == 0
        return run_dir / "prepare"

    def quick_prepare(self, out: Path, corpus: Path, tok: Path, languages: int = 3, lines: int = 200) -> Path:
        """Shards in prepare's format and layout plus a manifest, written in-process (no Ray): for fast tests."""
        from hyperofa_dist.formats.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok)
        blocks = {}
        for path in sorted(corpus.iterdir())[:languages]:
            lang = path.name.split(".")[0]
            ids = [i for line in synthetic.read_lines(path, lines) for i in tokenizer(line)["input_ids"]]
            n = len(ids) // self.BLOCK
            part = np.asarray(ids[: n * self.BLOCK], dtype=np.uint32).reshape(n, self.BLOCK)
            cut = max(1, n // 10)
            blocks[lang] = {"heldout": part[:cut], "train": part[cut:]}
        return write_prepare_dir(out, blocks, tok, self.BLOCK)

    def framed_prepare(self, out: Path, corpus: Path, tok: Path, languages: int = 3, lines: int = 200) -> Path:
        """Like `quick_prepare`, but the blocks framed as prepare frames them (each line followed by the separator,
        `[start] piece [end]`)."""
        from hyperofa_dist.formats.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok)
        blocks = {}
        for path in sorted(corpus.iterdir())[:languages]:
            part = framed_blocks(tokenizer, synthetic.read_lines(path, lines), self.BLOCK)
            cut = max(1, len(part) // 10)
            blocks[path.name.split(".")[0]] = {"heldout": part[:cut], "train": part[cut:]}
        return write_prepare_dir(out, blocks, tok, self.BLOCK)


@pytest.fixture(scope="session")
def pretrain_kit() -> PretrainKit:
    return PretrainKit()
