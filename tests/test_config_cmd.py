"""``mmfl config show`` / ``mmfl config keys``: every key, its value and its help; none undocumented."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmfl.cli import main
from mmfl.commands.config_cmd import flatten
from mmfl.config import config_to_dict, load_config
from mmfl.config_help import HELP, schema_keys


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def parse(out: str) -> dict[str, tuple[str, str]]:
    """``key value  # help`` lines (after the ``#`` source line) -> {key: (value, help)}."""
    rows = {}
    for line in out.splitlines()[1:]:
        body, _, note = line.partition("  # ")
        key, value = body.split(None, 1)
        rows[key] = (value.strip(), note)
    return rows


def test_every_schema_key_has_one_line_of_help() -> None:
    keys = {k.key for k in schema_keys()}
    assert sorted(keys - set(HELP)) == [], "config keys without a line in mmfl/config_help.py"
    assert sorted(set(HELP) - keys) == [], "help lines for keys the schema does not have"
    assert all(text.strip() and "\n" not in text for text in HELP.values())


def test_show_prints_every_resolved_key_with_value_and_help(capsys) -> None:
    code, out, _ = run(capsys, "show", "mmfl", "train.epochs=3", "model.backbone=resnet18")
    assert code == 0 and out.splitlines()[0] == "# mmfl + train.epochs=3 model.backbone=resnet18"
    rows = parse(out)
    cfg = load_config("mmfl", ["train.epochs=3", "model.backbone=resnet18"])
    assert list(rows) == [key for key, _ in flatten(config_to_dict(cfg))]
    assert rows["train.epochs"][0] == "3" and rows["model.backbone"][0] == "resnet18"
    assert rows["model.branches[3].partition"] == ("grid:2x2", HELP["model.branches[].partition"])
    assert all(note for _, note in rows.values())
    # The printed values are the config: fed back as overrides they rebuild it exactly.
    plain = [f"{key}={value}" for key, (value, _) in rows.items() if "[" not in key]
    assert load_config("mmfl", plain) == cfg


def test_show_reads_a_yaml_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 5\ndata:\n  root: /data/c2s\n")
    code, out, _ = run(capsys, "show", str(path), "seed=7")
    rows = parse(out)
    assert code == 0 and rows["train.epochs"][0] == "5" and rows["data.root"][0] == "/data/c2s" and rows["seed"][0] == "7"


@pytest.mark.parametrize("argv, words", [
    (("show", "mmfl", "model.backbon=resnet18"), "error: unknown key 'model.backbon'"),
    (("show", "nope"), "error: unknown preset 'nope'"),
    (("show", "mmfl", "train.lr=-1"), "error: train.lr: -1.0 must be a positive number"),
])
def test_show_refuses_bad_configs_in_one_line(capsys, argv: tuple[str, ...], words: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.strip().startswith(words) and "\n" not in err.strip()


def test_keys_lists_type_choices_default_and_help(capsys) -> None:
    code, out, _ = run(capsys, "keys")
    lines = out.splitlines()
    assert code == 0 and re.match(r"key +type +default +# help$", lines[0])
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [k.key for k in schema_keys()]
    assert re.match(r"model\.backbone +one of resnet18\|resnet34\|resnet50\|resnet101\|mobilenet_v2 +resnet50 +# "
                    + re.escape(HELP["model.backbone"]), rows["model.backbone"])
    assert re.match(r"model\.fusion_levels +list of int +\[4, 5\] +# ", rows["model.fusion_levels"])
    assert re.match(r"model\.branches\[\]\.dim +int +256 +# ", rows["model.branches[].dim"])
