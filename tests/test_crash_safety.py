"""Crash safety: SIGKILL at random moments loses at most the work since the last checkpoint.

* Training killed three times (at a seeded random moment, in the middle of a checkpoint save,
  and at a seeded random moment mid-epoch), each next run resumed with ``--resume`` when a
  ``last.pt`` exists and started afresh when not, ends with bit-identical weights, the same loss
  history and the same ``metrics.jsonl`` as one uninterrupted run (deterministic CPU mode).
* An index rebuild killed at random moments leaves the previous index answering, unchanged.
* Checkpoints and index files are verified on load: flipped bytes and truncation are refused
  with a one-line error, never loaded as a different model or gallery.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmfl.checkpoint import read_checkpoint
from mmfl.errors import CheckpointError, GalleryIndexError
from mmfl.index import Searcher, open_store, read_manifest
from mmfl.synth import generate

KILLS = 3
EPOCHS = 6
VARIANTS = 8  # shop photos per item in the index tests
SEED = 20261127
TRAIN = [
    "--config", "global", "--no-progress", "model.backbone=resnet18", "model.pretrained=none", "input.size=64", "train.batch_items=4",
    "train.images_per_item=4", "data.num_workers=0", "train.tensorboard=false", "train.warmup_epochs=0",
    "model.neck_width=64", "train.deterministic=true", "train.eval_every=0", f"train.epochs={EPOCHS}",
    "train.max_steps_per_epoch=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "synth"
    generate(root, items=24, seed=3, size=64)
    return root


def train_cmd(root: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "mmfl.cli", "train", *TRAIN, f"data.root={root}", f"output_dir={out}",
            *(["--resume"] if resume else [])]


def _epoch(last: Path) -> int | None:
    """Epoch recorded in last.pt (None when absent); it must always be readable when present."""
    return read_checkpoint(last)["train_state"]["epoch"] if last.exists() else None


def _wait_for_new_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 120) -> bool:
    """Wait until this run writes a checkpoint (last.pt's mtime changes); False if it ends first."""
    before = last.stat().st_mtime_ns if last.exists() else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and last.stat().st_mtime_ns != before:
            return True
        time.sleep(0.05)
    return False


def _wait_for_save_in_progress(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> None:
    """Return as soon as a checkpoint save's temp file exists (the save is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(folder.glob(".last.pt.tmp-*")):
            return
        time.sleep(0.005)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_weights(synth_root: Path,
                                                                                  tmp_path: Path) -> None:
    full_out, out = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted reference runs beside the killed runs (two cores: half the wall time).
    reference = subprocess.Popen(train_cmd(synth_root, full_out, False), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    rng = random.Random(SEED)
    last = out / "checkpoints" / "last.pt"
    kills: list[tuple[int | None, int | None]] = []  # (epoch in last.pt when the run started, when killed)
    resumed = 0
    while True:
        start_epoch = _epoch(last)
        proc = subprocess.Popen(train_cmd(synth_root, out, start_epoch is not None), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        resumed += start_epoch is not None
        if len(kills) < KILLS:
            if len(kills) == 0:
                # Anywhere from start-up to mid-training (before the first last.pt: a fresh start).
                time.sleep(rng.uniform(2.0, 8.0))
            elif len(kills) == 1:
                # The worst moment: the epoch is logged and its checkpoint half written.
                _wait_for_save_in_progress(proc, last.parent)
            else:
                # Mid-epoch after this run saved a checkpoint: the resume path is exercised.
                _wait_for_new_checkpoint(proc, last)
                time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append((start_epoch, _epoch(last)))  # _epoch also proves last.pt is never torn
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert ("resuming from" in err) == (start_epoch is not None)
        break
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]

    print(f"kills (epoch in last.pt at start, at kill): {kills}; runs resumed: {resumed}")
    assert len(kills) == KILLS and resumed >= 1, kills
    full, again = read_checkpoint(full_out / "checkpoints" / "last.pt"), read_checkpoint(last)
    assert again["train_state"]["epoch"] == full["train_state"]["epoch"] == EPOCHS
    for key, value in full["model"].items():
        assert torch.equal(value, again["model"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(again["train_state"]["history"]) == strip(full["train_state"]["history"])
    assert _metrics(out) == _metrics(full_out)  # no epoch logged twice by a run killed after logging it
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # torn saves of killed runs are cleaned up


# ----------------------------------------------------------------------------- index builds


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory: pytest.TempPathFactory):
    """A CSV gallery (16 items x 8 shop photos), a tiny checkpoint, and an index of its first 2 items."""
    from mmfl.checkpoint import load_model
    from mmfl.data.formats import read_dataset
    from mmfl.index import build_index

    from hostile.factory import photo, tiny_checkpoint

    work = tmp_path_factory.mktemp("crash-index")
    gallery = work / "gallery"
    gallery.mkdir()
    rows = ["path,item_id,domain,split"]
    for i in range(16):
        for v in range(VARIANTS):
            img = photo(i, (48, 48)).rotate(45 * v)
            img.paste((i * 15, 255 - i * 15, (i * 70) % 256), (10, 10, 30, 30))
            img.save(gallery / f"item{i}_{v}.png")
            rows.append(f"item{i}_{v}.png,item{i},shop,test")
    (gallery / "dataset.csv").write_text("\n".join(rows) + "\n")
    (gallery / "first.csv").write_text("\n".join(rows[: 1 + 2 * VARIANTS]) + "\n")
    checkpoint = tiny_checkpoint(work / "model.pt", num_items=16)
    index = work / "index"
    build_index(load_model(checkpoint), read_dataset(gallery / "first.csv", "csv").split("test"), index, progress=False)
    return work, gallery, checkpoint, index


def test_index_rebuild_killed_at_random_moments_leaves_the_previous_index_answering(index_setup) -> None:
    """Each kill leaves the index exactly as before that build (or, killed just after its commit,
    the complete new one): never a mix, and it answers searches throughout."""
    work, gallery, checkpoint, index = index_setup

    def argv(out: Path) -> list[str]:
        return [sys.executable, "-m", "mmfl.cli", "index", str(checkpoint), "--data", str(gallery / "dataset.csv"),
                "--format", "csv", "--out", str(out), "--no-progress", "--workers", "0", "--batch-size", "2"]

    # One uninterrupted build first: its duration places the kills, its files are the expected end state.
    started = time.monotonic()
    subprocess.run(argv(work / "uninterrupted"), env=ENV, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - started
    expected = read_manifest(work / "uninterrupted")
    rng = random.Random(SEED)
    kills = []
    for attempt in range(3):
        before = read_manifest(index)
        files = {name: (index / name).read_bytes() for name in before["files"]}
        proc = subprocess.Popen(argv(index), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # One random moment in each third of 35-100 % of a build: start-up (imports, model) takes
        # most of it, then the gallery is embedded and the new generation written.
        fraction = 0.35 + (attempt + rng.random()) * 0.65 / 3
        time.sleep(fraction * duration)
        if proc.poll() is not None:
            break  # finished before the kill; the rebuild below checks the same end state
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = read_manifest(index)
        dead = sorted(p.name for p in index.iterdir() if p.name not in files and p.name != "manifest.json")
        kills.append((round(fraction, 2), "after commit" if now != before else dead))
        if now != before:  # killed after its commit: the complete new index
            assert sorted(now["files"].values()) == sorted(expected["files"].values())
        else:
            assert {name: (index / name).read_bytes() for name in before["files"]} == files
        searcher = Searcher(index)
        try:
            answer = searcher.search(_open(gallery / "item1_3.png"), k=1)
        finally:
            searcher.close()
        assert answer["results"][0]["item_id"] == "item1"
    print(f"index builds killed at (fraction of a build, files of the dead build on disk): {kills}")
    assert kills, "every build finished before its kill: nothing was tested"
    done = subprocess.run(argv(index), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = read_manifest(index)
    assert after["count"] == 16 * VARIANTS
    assert sorted(after["files"].values()) == sorted(expected["files"].values())  # same vectors, same metadata
    leftovers = sorted(p.name for p in index.iterdir() if p.name != "manifest.json")
    assert leftovers == sorted(after["files"])  # killed builds' generations removed by the commit


def _open(path: Path):
    from mmfl.data.images import open_image

    return open_image(path)


# ----------------------------------------------------------------------------- verification on load


def test_flipped_or_truncated_checkpoint_never_loads_as_another_model(tmp_path: Path) -> None:
    from hostile.factory import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "model.pt")
    good = path.read_bytes()
    original = read_checkpoint(path)["model"]
    rng = random.Random(SEED)
    refused = 0
    for position in [rng.randrange(len(good)) for _ in range(12)] + [len(good) // 2]:
        broken = tmp_path / "flipped.pt"
        data = bytearray(good)
        data[position] ^= 1 << rng.randrange(8)
        broken.write_bytes(bytes(data))
        try:
            loaded = read_checkpoint(broken)["model"]
        except CheckpointError as exc:
            assert str(broken) in str(exc) and "\n" not in str(exc)
            refused += 1
            continue
        # Only a byte outside every record (zip alignment padding) may flip unnoticed: same weights.
        assert all(torch.equal(loaded[k], v) for k, v in original.items()), position
    assert refused >= 10
    for fraction in (0.0, 0.1, 0.5, 0.99):
        cut = tmp_path / "truncated.pt"
        cut.write_bytes(good[: int(len(good) * fraction)])
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            read_checkpoint(cut)


def test_index_files_are_checked_against_the_manifest_hashes(index_setup, tmp_path: Path) -> None:
    _, _, _, index = index_setup
    manifest = read_manifest(index)
    assert set(manifest["files"]) == {manifest["faiss"]["vectors"], manifest["faiss"]["metadata"]}
    for name in manifest["files"]:
        copy = tmp_path / name.replace(".", "_")
        shutil.copytree(index, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x04
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(GalleryIndexError, match="SHA-256 differs from the manifest"):
            open_store(copy)
    unhashed = tmp_path / "manifest without hashes"
    shutil.copytree(index, unhashed)
    (unhashed / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(GalleryIndexError, match="records no SHA-256"):
        open_store(unhashed)
    torn = tmp_path / "torn manifest"
    shutil.copytree(index, torn)
    (torn / "manifest.json").write_text((index / "manifest.json").read_text()[:-30])
    with pytest.raises(GalleryIndexError, match="unreadable manifest"):
        open_store(torn)
