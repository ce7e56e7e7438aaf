"""`mmfl eval`, `mmfl index`, `mmfl search` and `mmfl train --config` against hostile inputs.

A refused input must end the command with exit code 2 and exactly one stderr line
``error: ...`` naming the file (and the annotation line), never a traceback; ``--skip-bad``
turns bad records into counted skips; unusual but valid photos are simply accepted.
The commands run in-process through ``mmfl.cli.main`` (the same code path as the console
script); two tests run a real ``python -m mmfl.cli`` process for the exit code and ``--debug``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mmfl.cli import main
from mmfl.errors import CheckpointError
from mmfl.index.store import read_manifest

from .conftest import BAD_CHECKPOINTS
from .factory import (
    BAD_IMAGES, FORMATS, GOOD_IMAGES, IMAGE_CASES, TARGET, H, W, Entry, ImageCase, Layout, entries, with_entry,
    with_image, write_dataset,
)


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *names: object) -> str:
    """Exit 2, one stderr line starting with ``error: `` that names each of ``names``, no traceback."""
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def eval_args(checkpoint: Path, data: Path, fmt: str = "csv", *extra: str) -> list[object]:
    return ["eval", checkpoint, "--data", data, "--format", fmt, "--no-progress", "--workers", "0", *extra]


def index_args(checkpoint: Path, data: Path, out: Path, fmt: str = "csv", *extra: str) -> list[object]:
    return ["index", checkpoint, "--data", data, "--format", fmt, "--out", out, "--no-progress", "--workers", "0", *extra]


# ----------------------------------------------------------------------------- photos: eval and index

@pytest.mark.parametrize("case", BAD_IMAGES, ids=lambda c: c.name)
def test_eval_and_index_refuse_a_bad_photo_naming_it_and_its_line(case: ImageCase, checkpoint: Path, tmp_path: Path,
                                                                   capsys) -> None:
    ds = write_dataset("csv", tmp_path / "data ü", with_image(case))
    photo, where = ds.images[TARGET], ds.where["image"][TARGET]
    rc, _, err = cli(capsys, *eval_args(checkpoint, ds.data))
    line = assert_one_line_error(rc, err, photo, where)
    assert (case.header or case.decode) in line  # images are checked at header depth, decoded when embedded
    rc, _, err = cli(capsys, *index_args(checkpoint, ds.data, tmp_path / "index"))
    assert_one_line_error(rc, err, photo, where)
    assert not (tmp_path / "index" / "manifest.json").exists()


def _with_extra_shop_photos(cases: list[ImageCase]) -> list[Entry]:
    """The logical dataset plus one more shop photo of item 1 per case."""
    return entries() + [Entry(1, "shop", case.make(1), case.suffix) for case in cases]


def test_skip_bad_counts_every_bad_photo(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ds = write_dataset("csv", tmp_path / "data ü", _with_extra_shop_photos(BAD_IMAGES))
    bad = ds.images[len(entries()):]
    rc, out, err = cli(capsys, *eval_args(checkpoint, ds.data, "csv", "--skip-bad", "--json", tmp_path / "r.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_skipped"] == len(BAD_IMAGES) and f"skipped {len(BAD_IMAGES)} records" in err
    assert all(any(str(p) in s for s in result["skipped"]) for p in bad)
    assert result["num_gallery"] == 3 and result["num_queries"] == 3
    rc, out, err = cli(capsys, *index_args(checkpoint, ds.data, tmp_path / "index", "csv", "--skip-bad"))
    assert rc == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == len(BAD_IMAGES) and all(any(str(p) in s for s in skipped) for p in bad)
    assert read_manifest(tmp_path / "index")["count"] == 3  # the three good shop photos, nothing else lost


def test_unusual_but_valid_photos_are_accepted(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ds = write_dataset("csv", tmp_path / "data ü", _with_extra_shop_photos(GOOD_IMAGES))
    rc, out, err = cli(capsys, *eval_args(checkpoint, ds.data, "csv", "--json", tmp_path / "r.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_skipped"] == 0 and result["num_gallery"] == 3 + len(GOOD_IMAGES)
    rc, out, err = cli(capsys, *index_args(checkpoint, ds.data, tmp_path / "index"))
    assert rc == 0 and err == "", err
    assert read_manifest(tmp_path / "index")["count"] == 3 + len(GOOD_IMAGES)


def test_item_without_a_shop_photo_is_counted_not_dropped(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ds = write_dataset("csv", tmp_path / "data ü", layout=Layout(omit=5))  # item 2 has no shop photo
    rc, out, err = cli(capsys, *eval_args(checkpoint, ds.data, "csv", "--json", tmp_path / "r.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["num_queries"], result["num_queries_without_match"], result["num_gallery"]) == (2, 1, 2)
    assert "2 queries with a match, 1 without (not scored)" in out


def test_a_worker_process_error_is_still_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A photo that fails only when decoded, decoded in a DataLoader worker process (--workers 2)."""
    case = next(c for c in BAD_IMAGES if c.name == "truncated-pixels")
    ds = write_dataset("csv", tmp_path / "data ü", with_image(case))
    rc, _, err = cli(capsys, *eval_args(checkpoint, ds.data, "csv", "--workers", "2"))  # the last --workers wins
    assert_one_line_error(rc, err, ds.images[TARGET], ds.where["image"][TARGET], "truncated")


# ----------------------------------------------------------------------------- every reader through eval and index

@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_annotation_through_eval_and_index(fmt: str, checkpoint: Path, tmp_path: Path, capsys) -> None:
    ds = write_dataset(fmt, tmp_path / "data ü", with_entry(2, box=(-3, 1, 20, 18)))
    where = ds.where["box"][2]
    out = tmp_path / "index"
    for args in (eval_args(checkpoint, ds.data, fmt), index_args(checkpoint, ds.data, out, fmt)):
        rc, _, err = cli(capsys, *args)
        assert_one_line_error(rc, err, f"{where}: ", "negative coordinate")
    rc, _, err = cli(capsys, *index_args(checkpoint, ds.data, out, fmt), "--skip-bad")
    assert rc == 0 and err.startswith(f"skipped: {where}: "), err
    assert read_manifest(out)["count"] == 3


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_on_every_surface(kind: str, bad_checkpoints: dict[str, Path], gallery, index: Path,
                                                     tmp_path: Path, capsys) -> None:
    bad = bad_checkpoints[kind]
    words = BAD_CHECKPOINTS[kind]
    for args in (eval_args(bad, gallery.data), index_args(bad, gallery.data, tmp_path / "index"),
                 ["search", index, gallery.images[0], "--checkpoint", bad]):
        rc, _, err = cli(capsys, *args)
        assert_one_line_error(rc, err, bad, words)


def test_checkpoint_of_another_model_is_refused_by_the_index(index: Path, gallery, tmp_path: Path, capsys) -> None:
    from .factory import tiny_checkpoint

    other = tiny_checkpoint(tmp_path / "other ü.pt", seed=1)
    rc, _, err = cli(capsys, "search", index, gallery.images[0], "--checkpoint", other)
    assert_one_line_error(rc, err, index, "rebuild the index")


# ----------------------------------------------------------------------------- search

@pytest.mark.parametrize("case", [c for c in IMAGE_CASES], ids=lambda c: c.name)
def test_search_with_a_hostile_photo(case: ImageCase, index: Path, tmp_path: Path, capsys) -> None:
    photo = tmp_path / f"query é {case.name}{case.suffix}"
    data = case.make(1)
    if data is not None:
        photo.write_bytes(data)
    rc, out, err = cli(capsys, "search", index, photo, "--json", "--top-k", "3")
    if not case.accepted:
        line = assert_one_line_error(rc, err, photo)
        assert case.decode in line
        return
    assert rc == 0, err
    answer = json.loads(out)
    assert (answer["query"]["width"], answer["query"]["height"]) == (W, H)  # upright, whatever the EXIF
    assert len(answer["results"]) == 3


def test_search_finds_an_exif_rotated_photo_of_a_gallery_item(index: Path, gallery, tmp_path: Path, capsys) -> None:
    """The shop photo of item 1, stored turned with an EXIF tag: upright it matches its own item."""
    from .factory import exif_rotated

    photo = tmp_path / "turned.jpg"
    photo.write_bytes(exif_rotated(1, 6))
    rc, out, err = cli(capsys, "search", index, photo, "--json", "--top-k", "1")
    assert rc == 0, err
    assert json.loads(out)["results"][0]["item_id"] == "it1"


def test_search_refuses_broken_indexes_and_boxes(index: Path, gallery, tmp_path: Path, capsys) -> None:
    photo = gallery.images[0]
    rc, _, err = cli(capsys, "search", tmp_path / "no index", photo)
    assert_one_line_error(rc, err, tmp_path / "no index", "index folder not found")
    for breakage in ("manifest", "vectors"):
        broken = tmp_path / f"broken {breakage}"
        shutil.copytree(index, broken)
        manifest = read_manifest(broken)
        if breakage == "manifest":
            target = broken / "manifest.json"
            target.write_text(target.read_text()[:40])
            words = "unreadable manifest"
        else:
            target = broken / manifest["faiss"]["vectors"]
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
            words = "SHA-256 differs from the manifest"
        rc, _, err = cli(capsys, "search", broken, photo)
        assert_one_line_error(rc, err, target, words)
    boxes = (("1,2,3", "expected x1,y1,x2,y2"), ("100,100,200,200", "has no area"), ("5,5,2,9", "x2 must exceed"))
    for bbox, words in boxes:
        rc, _, err = cli(capsys, "search", index, photo, "--bbox", bbox)
        assert_one_line_error(rc, err, words)


# ----------------------------------------------------------------------------- config files

CONFIGS = {
    "unknown-key": ("train:\n  epochz: 3\n", "unknown key 'train.epochz'"),
    "wrong-type": ("train:\n  epochs: three\n", "train.epochs: expected an integer, got 'three'"),
    "wrong-choice": ("model:\n  backbone: resnet9\n", "model.backbone: 'resnet9' is not allowed"),
    "invalid-yaml": ("train: [1, 2\n", ":2: not valid YAML"),
    "not-a-mapping": ("- just\n- a list\n", "top level must be a mapping"),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bad_config_file(kind: str, tmp_path: Path, capsys) -> None:
    text, words = CONFIGS[kind]
    path = tmp_path / f"my config ü {kind}.yaml"
    path.write_text(text)
    rc, _, err = cli(capsys, "train", "--config", path, f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, path, words)
    assert not (tmp_path / "run").exists()


def test_bad_override_and_missing_config(tmp_path: Path, capsys) -> None:
    rc, _, err = cli(capsys, "train", "--config", "global", "train.epochs=x")
    assert_one_line_error(rc, err, "train.epochs: expected an integer")
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "gone.yaml")
    assert_one_line_error(rc, err, tmp_path / "gone.yaml", "does not exist")


# ----------------------------------------------------------------------------- a real process

def test_real_process_exit_code_and_debug(bad_checkpoints: dict[str, Path], gallery) -> None:
    bad = bad_checkpoints["truncated"]
    argv = ["eval", str(bad), "--data", str(gallery.data), "--format", "csv"]
    plain = subprocess.run([sys.executable, "-m", "mmfl.cli", *argv], capture_output=True, text=True, timeout=120)
    assert_one_line_error(plain.returncode, plain.stderr, bad, "not a readable checkpoint")
    with pytest.raises(CheckpointError):  # --debug lets the exception (and so its traceback) through
        main(["--debug", *argv])


def test_index_refuses_a_dataset_without_shop_photos(checkpoint: Path, tmp_path: Path, capsys) -> None:
    only_consumers = [replace(e, domain="consumer") for e in entries()]
    ds = write_dataset("csv", tmp_path / "data", only_consumers)
    rc, _, err = cli(capsys, *index_args(checkpoint, ds.data, tmp_path / "index"))
    assert_one_line_error(rc, err, ds.data, "no shop images")
