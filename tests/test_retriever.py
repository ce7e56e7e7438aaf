"""The Python API: ``mmfl.Retriever`` embeds like ``mmfl index`` and predicts like ``mmfl search``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmfl
from mmfl.cli import main
from mmfl.data.images import open_image
from mmfl.errors import CheckpointError, DataError, MMFLError
from mmfl.labels import AttributeDecoder
from mmfl.index.search import embed_query

from search_helpers import ATTRIBUTES

BOX = (4, 6, 40, 44)


@pytest.fixture(scope="module")
def retriever(checkpoint: Path) -> mmfl.Retriever:
    return mmfl.Retriever.load(checkpoint)


@pytest.fixture(scope="module")
def photos(gallery: Path) -> list[Path]:
    return sorted(gallery.glob("*.png"))


def test_embed_shapes_unit_norm_and_properties(retriever: mmfl.Retriever, photos: list[Path]) -> None:
    vectors = retriever.embed(photos[:5], boxes=[None, BOX, None, None, BOX], batch_size=2)
    assert vectors.shape == (5, retriever.embed_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert retriever.embed_dim == retriever.model.embed_dim
    assert retriever.input_size == 64
    assert retriever.attribute_names == ATTRIBUTES and retriever.category_names == []
    assert len(retriever.checkpoint_sha256) == 64
    assert retriever.embed([]).shape == (0, retriever.embed_dim)


def test_vectors_are_those_mmfl_index_stores(work: Path, gallery: Path, checkpoint: Path,
                                             retriever: mmfl.Retriever) -> None:
    import faiss

    out = work / "index"
    assert main(["index", str(checkpoint), "--data", str(gallery), "--format", "csv", "--out", str(out),
                 "--no-progress", "--workers", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    stored = faiss.read_index(str(out / manifest["faiss"]["vectors"]))
    images = [json.loads(line)["image"] for line in (out / manifest["faiss"]["metadata"]).read_text().splitlines()]
    ours = retriever.embed(images, batch_size=5)
    np.testing.assert_allclose(ours, stored.reconstruct_n(0, stored.ntotal), atol=1e-5)


def test_path_bytes_and_pil_image_give_the_same_vector(retriever: mmfl.Retriever, photos: list[Path]) -> None:
    path = photos[3]
    inputs = [path, str(path), path.read_bytes(), Image.open(path), Image.open(path).convert("RGBA")]
    vectors = retriever.embed(inputs, boxes=[BOX] * len(inputs))
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], len(inputs), axis=0), atol=1e-6)


def test_batching_does_not_change_vectors(retriever: mmfl.Retriever, photos: list[Path]) -> None:
    np.testing.assert_allclose(retriever.embed(photos, batch_size=1), retriever.embed(photos, batch_size=7), atol=1e-5)


def test_predict_matches_the_search_query_path(retriever: mmfl.Retriever, photos: list[Path]) -> None:
    preds = retriever.predict(photos[:3], boxes=[BOX, None, BOX])
    decoder = AttributeDecoder.from_meta(retriever.model.meta)
    for pred, photo, box in zip(preds, photos[:3], [BOX, None, BOX]):
        query = embed_query(retriever.model, open_image(photo), box)
        np.testing.assert_allclose(pred.embedding, query.vector, atol=1e-5)
        assert pred.attributes == query.attributes == decoder.attributes(pred.attribute_probs)
        assert pred.category is None and pred.category_probs is None
        assert pred.attribute_probs.shape == (len(ATTRIBUTES),)
    np.testing.assert_allclose(np.stack([p.embedding for p in preds]),
                               retriever.embed(photos[:3], boxes=[BOX, None, BOX]), atol=1e-6)


@pytest.mark.parametrize("images, boxes, words", [
    ("photo.jpg", None, "images: expected a list of images, got one str; pass [image]"),
    (Path("photo.jpg"), None, "got one PosixPath"),
    (b"\xff\xd8", None, "got one bytes"),
    ([1], None, "images[0]: expected a path, bytes or a PIL image, got int"),
    (["a.jpg", "b.jpg"], [None], "boxes: 1 boxes for 2 images"),
    (["a.jpg"], "1,2,3,4", "boxes: expected a list"),
    (["a.jpg"], [(1, 2, 3)], "boxes[0]: expected (x1, y1, x2, y2)"),
    (["a.jpg"], [(5, 5, 5, 9)], "boxes[0]: (5, 5, 5, 9) is empty"),
    (["a.jpg"], [(0, 0, float("nan"), 9)], "boxes[0]: (0, 0, nan, 9) has a coordinate that is not a finite number"),
])
def test_wrong_arguments_are_one_line_errors(retriever: mmfl.Retriever, images, boxes, words: str) -> None:
    with pytest.raises(MMFLError) as err:
        retriever.embed(images, boxes)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_images_name_the_file(retriever: mmfl.Retriever, photos: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    cases = [([tmp_path / "missing.jpg"], None, "missing.jpg: file not found"),
             ([broken], None, "broken.jpg: cannot decode image"),
             ([photos[0], b"garbage"], None, "images[1] (bytes): cannot decode image"),
             ([photos[0]], [(100, 100, 120, 130)], "box (100, 100, 120, 130) has no area inside the 48x48 image")]
    for images, boxes, words in cases:
        with pytest.raises(DataError) as err:
            retriever.embed(images, boxes)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:  # decoded in a worker process: still one line
        retriever.embed([photos[0], broken], workers=1)
    assert str(err.value).endswith("broken.jpg: cannot decode image (not a JPEG, PNG, WebP or other supported image format)")


def test_load_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found$"):
        mmfl.Retriever.load(tmp_path / "none.pt")
    with pytest.raises(MMFLError, match="checkpoint: expected a path"):
        mmfl.Retriever.load(["model.pt"])


def test_onnx_export_embeds_and_predicts_as_the_checkpoint(retriever: mmfl.Retriever, checkpoint: Path,
                                                           photos: list[Path], tmp_path: Path) -> None:
    """``Retriever.load(model.onnx)`` runs the exported graph with ONNX Runtime: the PyTorch Retriever's vectors
    (max abs diff under 1e-4), attribute probabilities and decisions, and the same facts about itself."""
    from mmfl.export import export_onnx

    graph = tmp_path / "model.onnx"
    export_onnx(retriever.model, graph, retriever.input_size)
    onnx = mmfl.Retriever.load(graph)
    assert (onnx.runtime, retriever.runtime) == ("onnxruntime", "pytorch")
    assert (onnx.embed_dim, onnx.input_size, onnx.attribute_names, onnx.checkpoint_sha256) == \
           (retriever.embed_dim, retriever.input_size, retriever.attribute_names, retriever.checkpoint_sha256)
    boxes = [BOX if i % 2 else None for i in range(len(photos))]
    ours, theirs = onnx.embed(photos, boxes, batch_size=5), retriever.embed(photos, boxes)
    assert ours.shape == theirs.shape and float(np.abs(ours - theirs).max()) < 1e-4
    for got, want in zip(onnx.predict(photos[:4]), retriever.predict(photos[:4])):
        np.testing.assert_allclose(got.attribute_probs, want.attribute_probs, atol=1e-4)
        assert got.attributes == want.attributes and got.category is None
    assert not onnx.has_box_head and not retriever.has_box_head
    with pytest.raises(MMFLError, match=r"model\.onnx: cannot detect garments: model has no box head \(no box graph"):
        onnx.detect(photos[:1])
    with pytest.raises(MMFLError, match="runs with ONNX Runtime on the CPU; use device='cpu', not 'cuda'"):
        mmfl.Retriever.load(graph, device="cuda")
    with pytest.raises(MMFLError, match="none.onnx: ONNX file not found"):
        mmfl.Retriever.load(tmp_path / "none.onnx")


def test_import_mmfl_stays_light() -> None:
    code = ("import sys, mmfl; light = 'torch' not in sys.modules; "
            "from mmfl import Retriever; print(light, Retriever.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "mmfl.retriever"]
