import pytest

from hyperofa_dist.config import Config, flatten, load_config, parse_override
from hyperofa_dist.errors import HyperofaError


def test_defaults_fill_every_section():
    cfg = load_config()
    assert cfg.prepare.block_size == 512
    assert cfg.prepare.sampling.alpha == 0.3
    assert cfg.tracking.enabled is True
    assert set(cfg.effective()) == set(Config.model_fields)


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 5\nprepare:\n  block_size: 128\n  sampling:\n    alpha: 0.5\n")
    cfg = load_config(path, ["prepare.block_size=64", "corpus.languages=[eng_Latn, deu_Latn]", "ray.address=auto"])
    assert cfg.run.seed == 5
    assert cfg.prepare.block_size == 64
    assert cfg.prepare.sampling.alpha == 0.5
    assert cfg.corpus.languages == ["eng_Latn", "deu_Latn"]
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.blocksize=3", "config key prepare.blocksize does not exist"),
        ("nosuch.key=1", "config key nosuch does not exist"),
        ("prepare.block_size=abc", "config key prepare.block_size: Input should be a valid integer"),
        ("prepare.block_size=4", "config key prepare.block_size: Input should be greater than or equal to 8"),
        ("prepare.sampling.alpha=0", "config key prepare.sampling.alpha: Input should be greater than 0"),
        ("prepare.heldout_fraction=1.0", "config key prepare.heldout_fraction"),
        ("corpus.format=csv", "config key corpus.format"),
        ("corpus.languages=[english]", "'english' is not a lang_Script code"),
        ("tracking.enabled=maybe", "config key tracking.enabled"),
        ("run.seed='7'", "config key run.seed"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(HyperofaError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(HyperofaError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(HyperofaError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(HyperofaError, match="is not key=value"):
        parse_override("prepare.block_size")


def test_flatten_for_mlflow_params():
    flat = flatten(load_config(None, ["run.seed=3"]).effective())
    assert flat["run.seed"] == 3
    assert flat["prepare.sampling.alpha"] == 0.3
    assert all(not isinstance(v, dict) for v in flat.values())


def test_config_reference_lists_every_key_and_marks_the_execution_only_ones():
    """One row per leaf key; `execution` exactly on the keys Config.fingerprint leaves out (input paths aside)."""
    import re

    from hyperofa_dist.config import Config, flatten, is_input_path
    from hyperofa_dist.configdoc import leaves, render

    row = re.compile(r"^\| `([a-z_.0-9]+)` \| .*? \| `.*?` \| (execution|input path|) \| .+ \|$", re.M)
    rows = {m.group(1): m.group(2) for m in row.finditer(render())}
    config = Config()
    result_keys = flatten(config.fingerprint(*type(config).model_fields))
    expected = {}
    for key, info, _, _ in leaves(config):
        kept = key in result_keys or any(k.startswith(f"{key}.") for k in result_keys)
        expected[key] = "input path" if is_input_path(info) else ("" if kept else "execution")
    assert rows == expected
    assert len(rows) > 200 and {"run.dir", "pretrain.bench.vocab_size"} <= {k for k, v in rows.items() if v}
    assert "| `run.seed` | int (≥ 0) | `0` |  | " in render()
    assert "| `tracking.log_models` | one of: link, copy, none | `link` | execution | " in render()


def test_docs_config_md_is_generated_from_the_current_schema():
    from pathlib import Path

    from hyperofa_dist.configdoc import REGENERATE, render

    path = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert path.read_text(encoding="utf-8") == render(), f"docs/CONFIG.md is stale: run `{REGENERATE}` and commit it"


def test_docs_config_command_writes_the_reference_and_check_refuses_a_stale_one(tmp_path, capsys):
    from hyperofa_dist import cli
    from hyperofa_dist.configdoc import render

    out = tmp_path / "CONFIG.md"
    assert cli.main(["docs", "config", "--check", "--output", str(out)]) == 2
    assert f"{out}: missing; run `hyperofa docs config`" in capsys.readouterr().err
    assert cli.main(["docs", "config", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    assert cli.main(["docs", "config", "--check", "--output", str(out)]) == 0
    out.write_text(render().replace("Global seed", "The seed"), encoding="utf-8")
    assert cli.main(["docs", "config", "--check", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"hyperofa docs: error: {out}: stale (the config schema changed); run `hyperofa docs config` "
                       "and commit the file")


def test_fingerprint_leaves_out_execution_only_keys_and_keeps_the_rest():
    base = load_config(None, [])
    changed_execution = load_config(None, ["pretrain.master_port=29999", "prepare.max_retries=7", "run.dir=/elsewhere",
                                           "pretrain.log_every=3", "mapping.words_per_task=5"])
    assert base.fingerprint("pretrain", "prepare", "run", "mapping") == changed_execution.fingerprint(
        "pretrain", "prepare", "run", "mapping")
    changed_result = load_config(None, ["pretrain.lr=0.001"])
    assert base.fingerprint("pretrain") != changed_result.fingerprint("pretrain")
    assert "master_port" not in base.fingerprint("pretrain")["pretrain"]
    assert base.with_changes({"init.method": "ofa"}).init.method == "ofa"


def test_a_language_code_must_name_an_iso_15924_script():
    from hyperofa_dist.config import PACKAGED_CONFIGS

    with pytest.raises(HyperofaError, match=r"^config key corpus.languages: Japn in jpn_Japn is not an ISO 15924 "
                                            r"script code \(did you mean jpn_Jpan\?\)"):
        load_config(None, ["corpus.languages=[eng_Latn, jpn_Japn]"])
    with pytest.raises(HyperofaError, match=r"evaluate.languages: Latm in deu_Latm is not an ISO 15924"):
        load_config(None, ["evaluate.languages=[deu, deu_Latm]"])
    assert load_config(None, ["corpus.languages=[jpn_Jpan, qaa_Qaab, cmn_Hani]"]).corpus.languages[0] == "jpn_Jpan"
    with pytest.raises(HyperofaError, match="Qaby in qaa_Qaby is not an ISO 15924"):  # private use ends at Qabx
        load_config(None, ["corpus.languages=[qaa_Qaby]"])
    # every packaged config: the codes it lists load (a wrong one is refused above), and Japanese is jpn_Jpan
    for path in sorted(PACKAGED_CONFIGS.glob("*.yaml")):
        config = load_config(path)
        if config.corpus.languages and any(c.startswith("jpn_") for c in config.corpus.languages):
            assert "jpn_Jpan" in config.corpus.languages, path

