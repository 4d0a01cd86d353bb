"""Sentence retrieval: hand-computed ranks, chance level, identical and shuffled sides, file-layout errors."""

from __future__ import annotations

import numpy as np
import pytest

from hyperofa_dist import synthetic
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.evaluate import retrieval
from hyperofa_dist.evaluate.model import hidden_state_index
from hyperofa_dist.formats.models import load_model
from hyperofa_dist.formats.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, source_tokenizers):
    path = synthetic.make_tiny_model("xlmr", source_tokenizers["xlmr"], tmp_path_factory.mktemp("m") / "model")
    return load_model(path, "AutoModel", add_pooling_layer=False), load_tokenizer(path)


def run(tiny, data_dir, **kw):
    model, tok = tiny
    return retrieval.evaluate_retrieval(model, tok, data_dir, layer_index=2, batch_size=16, **kw)


def test_ranks_and_topk_equal_hand_computed_values():
    e = np.eye(4, dtype=np.float32)
    index = e
    queries = np.stack([e[0], e[0] + 0.1 * e[1], e[3] + 0.5 * e[2], -e[3]])
    # q0 -> own row first; q1 -> row 0 beats its row 1; q2 -> row 3 beats its row 2; q3 -> its row 3 is last.
    ranks = retrieval.retrieval_ranks(queries, index, batch_size=3)
    assert ranks.tolist() == [0, 1, 1, 3]
    assert retrieval.topk_accuracy(ranks, (1, 2, 3, 4)) == {"top1": 25.0, "top2": 75.0, "top3": 75.0, "top4": 100.0}
    # One vector for everything: ties go to the earlier line, so row i ranks i-th, not first.
    same = np.ones((5, 3), dtype=np.float32)
    assert retrieval.retrieval_ranks(same, same).tolist() == [0, 1, 2, 3, 4]


def test_unrelated_embeddings_score_chance():
    # Independent random vectors: each aligned row's rank is uniform on 0..N-1, so E[top-k] = k/N. With N=400 and
    # k=10 that is 2.5% with a binomial standard deviation of 0.78 points; the bound is 4 deviations.
    rng = np.random.default_rng(0)
    n = 400
    acc = retrieval.topk_accuracy(retrieval.retrieval_ranks(rng.normal(size=(n, 32)), rng.normal(size=(n, 32))))
    assert abs(acc["top10"] - 2.5) < 3.2
    assert abs(acc["top5"] - 1.25) < 2.3
    assert acc["top1"] < 1.5


@pytest.mark.parametrize("naming", ["glot500", "xtreme"])
def test_identical_sides_give_100_percent(tmp_path, world, tiny, naming):
    # The "English" side is the same language as the other side: every query has an identical twin.
    synthetic.write_retrieval_data(tmp_path, world, "qac_Latn", ["qac_Latn"], n=60, naming=naming)
    results, skipped = run(tiny, tmp_path)
    lang = "qac_Latn" if naming == "glot500" else "qac"
    assert results == {lang: {"top1": 100.0, "top5": 100.0, "top10": 100.0}}
    assert skipped == {}


def test_shuffled_side_scores_fixed_points_and_near_chance(tmp_path, world, tiny):
    n = 200
    paths = synthetic.write_retrieval_data(tmp_path, world, "qac_Latn", ["qac_Latn"], n=n)
    lang_path = paths["qac_Latn"][0]
    lines = lang_path.read_text(encoding="utf-8").splitlines()
    perm = np.random.default_rng(3).permutation(n)
    lang_path.write_text("\n".join(lines[p] for p in perm) + "\n", encoding="utf-8")
    results, _ = run(tiny, tmp_path)
    # Query i's twin now sits at the row j with perm[j] == i, so the aligned row is first only at fixed points.
    fixed = int(np.sum(perm == np.arange(n)))
    assert results["qac_Latn"]["top1"] == pytest.approx(100.0 * fixed / n)
    # Chance for top-10 is 5%; an untrained model's similarities among unrelated sentences carry little signal, so
    # it must stay within a factor of three of chance.
    assert results["qac_Latn"]["top10"] <= 15.0


def test_missing_pair_file_is_skipped_and_listed(tmp_path, world, tiny):
    paths = synthetic.write_retrieval_data(tmp_path, world, "qaa_Latn", ["qab_Cyrl", "qac_Latn"], n=30)
    paths["qab_Cyrl"][1].unlink()
    results, skipped = run(tiny, tmp_path, languages=["qab_Cyrl", "qac_Latn", "qzz_Latn"])
    assert sorted(results) == ["qac_Latn"]
    assert skipped == {"qab_Cyrl": "missing tatoeba.qab_Cyrl-eng_Latn.eng_Latn", "qzz_Latn": "no parallel files"}


def test_line_count_mismatch_names_the_file(tmp_path, world, tiny):
    paths = synthetic.write_retrieval_data(tmp_path, world, "qaa_Latn", ["qac_Latn"], n=30)
    lang_path = paths["qac_Latn"][0]
    lang_path.write_text("\n".join(lang_path.read_text(encoding="utf-8").splitlines()[:29]) + "\n", encoding="utf-8")
    with pytest.raises(HyperofaError, match=r"tatoeba\.qac_Latn-eng_Latn\.qac_Latn: 29 lines but .* has 30"):
        run(tiny, tmp_path)


def test_no_complete_pair_is_an_error(tmp_path):
    (tmp_path / "tatoeba.qac_Latn-eng_Latn.qac_Latn").write_text("a\n", encoding="utf-8")
    with pytest.raises(HyperofaError, match="no complete parallel file pairs .*missing"):
        run((None, None), tmp_path)


def test_layer_must_exist_in_the_model(tmp_path):
    assert hidden_state_index(8, 12, tmp_path) == 8
    assert hidden_state_index(-1, 2, tmp_path) == 2
    assert hidden_state_index(0, 2, tmp_path) == 0
    with pytest.raises(HyperofaError, match="evaluate.layer=8 but .* has 2 layers"):
        hidden_state_index(8, 2, tmp_path)
    with pytest.raises(HyperofaError, match="evaluate.layer=-4"):
        hidden_state_index(-4, 2, tmp_path)


def test_language_codes_resolve_to_each_benchmarks_own():
    from hyperofa_dist.evaluate.languages import resolve

    found, skipped = resolve(["deu_Latn", "srp", "fra", "eng_Latn", "deu", "xyz_Latn"],
                             ["deu", "srp_Cyrl", "srp_Latn", "fra_Latn", "eng_Latn"], "no data")
    assert found == {"deu_Latn": "deu", "fra": "fra_Latn", "eng_Latn": "eng_Latn"}
    assert skipped == {"srp": "ambiguous: the data has srp_Cyrl, srp_Latn; name one",
                       "deu": "the same data as deu_Latn", "xyz_Latn": "no data"}
    # Written as the data writes it, a code is taken as it is even when a script-less twin exists.
    assert resolve(["deu_Latn"], ["deu", "deu_Latn"], "")[0] == {"deu_Latn": "deu_Latn"}
