"""`hyperofa bench prepare-scale`'s generated language: the published parquet layout, one file per 1x piece, planned
by row group (the bench itself runs Ray three times; its figures come from `hyperofa bench prepare-scale`)."""

from __future__ import annotations

from hyperofa_dist import synthetic
from hyperofa_dist.bench import prepare_scale
from hyperofa_dist.config import CorpusConfig
from hyperofa_dist.formats.corpus import discover, plan_units, read_unit


def test_generated_language_is_published_parquet_planned_by_row_group(tmp_path):
    world = synthetic.World(synthetic.default_languages(1), n_concepts=300, seed=0)
    root = prepare_scale.generate(tmp_path, world, scale=3, base_bytes=20_000, rows_per_group=40, seed=0)
    [source] = discover(CorpusConfig(path=str(root), format="glot500_local"))
    assert source.lang == prepare_scale.LANG and source.split == "train"
    assert [f.name for f in source.files] == ["0000.parquet", "0001.parquet", "0002.parquet"]
    units = plan_units([source], chunk_bytes=1)
    assert all(u.kind == "row_groups" and u.end - u.start == 1 and u.rows <= 40 for u in units)
    pieces = [[x for u in units if u.path == str(f) for x in read_unit(u)] for f in source.files]
    sizes = [sum(len(s.encode()) + 1 for s in piece) for piece in pieces]
    assert all(18_000 < size < 22_000 for size in sizes)  # each file about the 1x size
    assert len({tuple(p[:20]) for p in pieces}) == 3  # different sentences per piece
