"""Config: presets, files, overrides and one-line errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfl.config import ConfigError, config_from_dict, config_to_dict, dump_config, load_config, parse_partition, preset_names


def test_presets_exist_and_differ() -> None:
    assert {"global", "mgn", "mmfl"} <= set(preset_names())
    g, m, f = (load_config(name) for name in ("global", "mgn", "mmfl"))
    assert g.model.fusion == "none" and len(g.model.branches) == 1
    assert m.model.fusion == "none" and len(m.model.branches) == 3
    assert f.model.fusion == "bidirectional" and {b.partition for b in f.model.branches} >= {"whole", "grid:2x2"}


def test_overrides_are_typed() -> None:
    cfg = load_config("mmfl", ["model.backbone=resnet18", "train.epochs=3", "train.lr=1e-3",
                               "input.flip=false", "model.fusion_levels=[4,5]", "model.branches=[{name: g, level: 5}]"])
    assert cfg.model.backbone == "resnet18" and cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.input.flip is False and cfg.model.fusion_levels == [4, 5]
    assert cfg.model.branches[0].name == "g" and cfg.model.branches[0].dim == 256


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.backbon=resnet18", "unknown key 'model.backbon'"),
        ("nosuch.key=1", "unknown key 'nosuch.key'"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("model.fusion=sideways", "model.fusion: 'sideways' is not allowed"),
        ("train.amp=maybe", "train.amp: expected true/false"),
        ("model.branches=[{name: g, partition: 'stripes:x'}]", "model.branches[0].partition"),
        ("train.epochs", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("mmfl", [override])
    message = str(exc.value)
    assert needle in message and "\n" not in message


def test_yaml_file_and_unknown_key_in_file(tmp_path: Path) -> None:
    good = tmp_path / "run.yaml"
    good.write_text("model: {backbone: resnet34}\ntrain: {epochs: 2}\n")
    assert load_config(str(good)).model.backbone == "resnet34"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*allowed: epochs"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config("mgn", ["seed=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_partition_parsing() -> None:
    assert parse_partition("whole") == (1, 1)
    assert parse_partition("stripes:3") == (3, 1)
    assert parse_partition("grid:2x4") == (2, 4)
    with pytest.raises(ConfigError):
        parse_partition("grid:0x2")
