"""``mmfl embed``: folders, list files and datasets to .npy + .json or .parquet, the API's vectors, resumable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mmfl
from mmfl.cli import main


BOX = (4, 6, 40, 44)


@pytest.fixture(scope="module")
def retriever(checkpoint: Path) -> mmfl.Retriever:
    return mmfl.Retriever.load(checkpoint)


def embed(*argv: str) -> int:
    return main(["embed", *argv, "--no-progress", "--workers", "0", "--device", "cpu"])


def test_folder_to_npy_keeps_ids_and_paths_and_matches_the_api(work: Path, gallery: Path, checkpoint: Path,
                                                               retriever: mmfl.Retriever, capsys) -> None:
    out = work / "folder" / "feats.npy"
    assert embed(str(checkpoint), str(gallery), "--out", str(out), "--chunk-size", "10") == 0
    assert "24 images" in capsys.readouterr().out and not out.with_name("feats.npy.partial").exists()
    meta = json.loads(out.with_suffix(".json").read_text())
    vectors = np.load(out)
    rows = meta["rows"]
    assert vectors.shape == (24, retriever.embed_dim) == (meta["count"], meta["embed_dim"])
    assert meta["checkpoint_sha256"] == retriever.checkpoint_sha256 and meta["vectors"] == "feats.npy"
    assert [r["id"] for r in rows] == sorted(p.name for p in gallery.glob("*.png"))
    assert all(Path(r["path"]) == gallery / r["id"] and r["box"] is None for r in rows)
    np.testing.assert_allclose(vectors, retriever.embed([r["path"] for r in rows]), atol=1e-5)


def test_dataset_to_parquet_keeps_item_ids_and_boxes(work: Path, gallery: Path, checkpoint: Path,
                                                     retriever: mmfl.Retriever) -> None:
    import pyarrow.parquet as pq

    table = gallery / "boxed.csv"
    lines = ["path,item_id,domain,split,x1,y1,x2,y2"]
    for i, png in enumerate(sorted(gallery.glob("id_0[0-3]_*.png"))):
        box = ",".join(map(str, BOX)) if i % 2 else ",,,"
        lines.append(f"{png.name},{png.name[:5]},{'consumer' if 'consumer' in png.name else 'shop'},test,{box}")
    table.write_text("\n".join(lines) + "\n")
    out = work / "boxed.parquet"
    assert embed(str(checkpoint), str(table), "--format", "csv", "--domain", "shop", "--out", str(out)) == 0
    got = pq.read_table(out)
    rows = got.to_pylist()
    assert len(rows) == 8 and {r["domain"] for r in rows} == {"shop"} and {r["split"] for r in rows} == {"test"}
    assert [r["id"] for r in rows] == [Path(r["path"]).name[:5] for r in rows]
    boxes = [tuple(r["box"]) if r["box"] else None for r in rows]
    assert boxes.count(BOX) == 4 and boxes.count(None) == 4
    assert json.loads(got.schema.metadata[b"mmfl"])["checkpoint_sha256"] == retriever.checkpoint_sha256
    vectors = np.array([r["embedding"] for r in rows], np.float32)
    np.testing.assert_allclose(vectors, retriever.embed([r["path"] for r in rows], boxes), atol=1e-5)


def test_interrupted_run_resumes_from_its_finished_chunks(work: Path, gallery: Path, checkpoint: Path,
                                                          retriever: mmfl.Retriever, capsys) -> None:
    photos = sorted(gallery.glob("*.png"))[:12]
    broken = work / "later.png"
    broken.write_bytes(b"truncated")
    listing = work / "list.txt"
    names = [f"{photos[0]} {','.join(map(str, BOX))}", "# comment", *map(str, photos[1:9]), str(broken),
             *map(str, photos[9:11])]
    listing.write_text("\n".join(names) + "\n")
    out = work / "resumed.npy"
    partial = work / "resumed.npy.partial"

    assert embed(str(checkpoint), str(listing), "--out", str(out), "--chunk-size", "4") == 2
    assert capsys.readouterr().err.strip() == f"error: {broken}: cannot decode image (not a JPEG, PNG, WebP or other supported image format)"
    done = sorted(partial.iterdir())
    assert [p.name[:12] for p in done] == ["chunk-000000", "chunk-000001"] and not out.exists()
    # Mark the first chunk: if the re-run embedded it again instead of reusing it, the mark would be gone.
    marked = np.zeros((4, retriever.embed_dim), np.float32)
    marked[:, 0] = 1.0
    np.save(done[0], marked)

    broken.write_bytes(photos[11].read_bytes())  # the bad image fixed
    assert embed(str(checkpoint), str(listing), "--out", str(out), "--chunk-size", "4") == 0
    captured = capsys.readouterr()
    assert f"resuming: 2 of 3 chunks already in {partial}" in captured.err
    assert "(3 chunks, 2 reused)" in captured.out and not partial.exists()
    vectors, rows = np.load(out), json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["box"] == list(BOX) and rows[0]["id"] == str(photos[0]) and len(rows) == 12
    np.testing.assert_array_equal(vectors[:4], marked)
    boxes = [tuple(r["box"]) if r["box"] else None for r in rows]
    np.testing.assert_allclose(vectors[4:], retriever.embed([r["path"] for r in rows[4:]], boxes[4:]), atol=1e-5)


def test_bad_invocations_are_one_line(work: Path, gallery: Path, checkpoint: Path, capsys) -> None:
    listing = work / "missing.txt"
    listing.write_text("nowhere.png\n")
    empty = work / "empty"
    empty.mkdir()
    cases = [
        ((str(gallery), "--out", str(work / "x.csv")), "expected a .npy or .parquet file name"),
        ((str(listing), "--out", str(work / "x.npy")), f"{listing}:1: image {work / 'nowhere.png'} not found"),
        ((str(gallery), "--split", "test", "--out", str(work / "x.npy")), "give --format too"),
        ((str(empty), "--out", str(work / "x.npy")), "no images to embed"),
        ((str(gallery), "--format", "csv", "--split", "val", "--out", str(work / "x.npy")), "no records in split 'val'"),
        ((str(gallery), "--out", str(work / "x.npy"), "--chunk-size", "0"), "--chunk-size 0: must be at least 1"),
    ]
    for argv, words in cases:
        assert embed(str(checkpoint), *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err


def test_skip_bad_skips_counts_and_lists_bad_images_also_when_resumed(work: Path, gallery: Path, checkpoint: Path,
                                                                     retriever: mmfl.Retriever, capsys) -> None:
    """Without --skip-bad (or with --strict) a bad image is one line naming it; with it, each bad image is a
    ``skipped:`` line on stderr and an entry of the output's ``skipped``, the rest is embedded as the API does,
    and a resumed run reuses the chunk that skipped (listing it again)."""
    import pyarrow.parquet as pq

    folder = work / "with-bad"
    folder.mkdir()
    good = sorted(gallery.glob("id_0[0-1]_*.png"))
    for photo in good:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.png").write_bytes(b"truncated")
    reason = f"{folder / 'broken.png'}: cannot decode image (not a JPEG, PNG, WebP or other supported image format)"
    out = work / "skipping.npy"
    for strict in ([], ["--strict"]):
        assert embed(str(checkpoint), str(folder), "--out", str(out), *strict) == 2
        assert capsys.readouterr().err.strip() == f"error: {reason}"

    out.mkdir()  # the final write fails after every chunk is done: the next run resumes from them
    with pytest.raises(IsADirectoryError):
        embed(str(checkpoint), str(folder), "--out", str(out), "--chunk-size", "4", "--skip-bad")
    assert capsys.readouterr().err.count(f"skipped: {reason}\n") == 1
    out.rmdir()
    assert embed(str(checkpoint), str(folder), "--out", str(out), "--chunk-size", "4", "--skip-bad") == 0
    captured = capsys.readouterr()
    assert "resuming: 2 of 2 chunks" in captured.err and captured.err.count(f"skipped: {reason}\n") == 1
    assert f": {len(good)} images, 1 skipped," in captured.out and "(2 chunks, 2 reused)" in captured.out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["count"], meta["num_skipped"], meta["skipped"]) == (len(good), 1, [reason])
    assert [r["id"] for r in meta["rows"]] == [p.name for p in good]
    np.testing.assert_allclose(np.load(out), retriever.embed(good), atol=1e-5)

    listing = work / "skip-list.txt"
    listing.write_text(f"{good[0]}\nnowhere.png\n{folder / 'broken.png'}\n{good[1]}\n")
    table = work / "skipping.parquet"
    assert embed(str(checkpoint), str(listing), "--out", str(table), "--skip-bad") == 0
    missing = f"{listing}:2: image {work / 'nowhere.png'} not found"
    assert capsys.readouterr().err.splitlines() == [f"skipped: {missing}", f"skipped: {reason}"]
    got = pq.read_table(table)
    assert json.loads(got.schema.metadata[b"mmfl"])["skipped"] == [missing, reason]
    assert got.column("path").to_pylist() == [str(good[0]), str(good[1])]
    np.testing.assert_allclose(np.array(got.column("embedding").to_pylist(), np.float32), retriever.embed(good[:2]),
                               atol=1e-5)
