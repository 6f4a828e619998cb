"""Typos a person makes on the command line are named, not silently ignored or blamed on the wrong argument:
an unknown field in `make-checkpoint --override` (with the closest known field), and a stray word after a boolean
flag (`--json maybe`), which fills the next free parameter and must be reported as that flag."""

import pytest

from flashport.cli import main
from flashport.config import ConfigError, ModelConfig


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flashport: error: ") and "\n" not in err, (rc, err)
    return err


def test_override_refuses_an_unknown_field_naming_the_closest(tmp_path, capsys):
    out = tmp_path / "ck"
    err = _err(capsys, ["make-checkpoint", "--out", str(out), "--override", '{"num_hidden_layer": 3}'])
    assert "'num_hidden_layer'" in err and "num_hidden_layers" in err
    assert not out.exists()  # refused before the directory was made


def test_override_takes_every_spelling_it_knows():
    cfg = ModelConfig.preset("flash-tiny")
    assert cfg.override({"num_hidden_layers": 3}).num_hidden_layers == 3
    for legacy in ({"compress_ratios": [0, 4, 128, 4]}, {"qk_rope_head_dim": 16}, {"rope_scaling": None},
                   {"initializer_range": 0.02}, {"quantization_config": None}):
        assert cfg.override({**legacy, "num_hidden_layers": 3}).num_hidden_layers == 3
    with pytest.raises(ConfigError, match="unknown config.json field 'bogus'"):
        cfg.override({"bogus": 1})


def test_every_field_an_override_accepts_takes_effect():
    """An override field that is accepted changes the config (or is refused): `hca_rate` once passed the unknown-
    field check (flashport's own name) and was then ignored, so a checkpoint with the old rate was written."""
    cfg = ModelConfig.preset("flash-mini")
    before = cfg.to_dict()
    ignored_as_in_transformers = {"num_key_value_heads"}  # transformers reads it and ignores it (from_dict)
    for key, value in before.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in ignored_as_in_transformers:
            continue
        changed = value * 2 if value else 1
        try:
            after = cfg.override({key: changed}).to_dict()
        except ConfigError:
            continue
        assert after != before, f"override {{{key!r}: {changed}}} was accepted and ignored"
    assert cfg.override({"hca_rate": 128}).compress_ratios == [0, 0, 4, 128, 4, 128, 4, 128]
    assert cfg.override({"csa_rate": 8, "hca_rate": 128}).compress_ratios == [0, 0, 8, 128, 8, 128, 8, 128]
    with pytest.raises(ConfigError, match="field 'hca_rate': must be a positive int"):
        cfg.override({"hca_rate": "x"})


def test_a_stray_word_is_named_as_the_flag_it_filled(tiny_release, capsys):
    err = _err(capsys, ["generate", str(tiny_release), "--prompt", "hi", "--json", "maybe"])
    assert "'maybe'" in err and "--max-new-tokens" in err and "positional" in err
