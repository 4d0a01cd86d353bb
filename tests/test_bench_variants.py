"""`hyperofa bench variants`: the seeds share the check's inputs, and the acceptance counts compare per seed."""

from __future__ import annotations

from hyperofa_dist.bench import variants as V


def test_every_seed_and_hypernetwork_gets_its_own_run_dir_over_the_shared_inputs(tmp_path):
    for name in V.INPUT_DIRS:
        (tmp_path / "inputs" / name).mkdir(parents=True)
        (tmp_path / "inputs" / name / "manifest.json").write_text(name)
    plain, shuffled = V.seed_dir(tmp_path, 1, False), V.seed_dir(tmp_path, 1, True)
    assert plain != shuffled and {plain.name, shuffled.name} == {"seed1", "seed1-shuffled"}
    for run_dir in (plain, shuffled):
        for name in V.INPUT_DIRS:
            assert (run_dir / name).is_symlink()
            assert (run_dir / name / "manifest.json").read_text() == name
    assert V.seed_dir(tmp_path, 1, False) == plain  # a resumed run finds the same directory


def test_wins_count_the_seeds_with_a_strictly_lower_new_token_loss():
    per_seed = {"a": {"new_token_mlm_loss": [1.0, 2.0, 3.0]}, "b": {"new_token_mlm_loss": [1.5, 2.0, 2.5]}}
    assert V.wins_against(per_seed, "a", "b") == 1
    assert V.wins_against(per_seed, "b", "a") == 1
    assert V.wins_against(per_seed, "a", "a") == 0


def test_every_variant_modifies_a_listed_variant_of_the_same_method_or_is_a_baseline():
    for name, spec in V.VARIANTS.items():
        if spec.parent is not None:
            assert V.VARIANTS[spec.parent].method == spec.method, name
    assert {"random", "ofa", "hyperofa"} <= {n for n, s in V.VARIANTS.items() if s.parent is None}


def test_the_passes_run_every_variant_once_the_acceptance_figures_first():
    assert sorted(n for names in V.PASSES for n in names) == sorted(V.VARIANTS)
    assert {"random", "ofa", "hyperofa"} <= set(V.PASSES[0])
