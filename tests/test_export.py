"""ONNX export: parity with PyTorch (ONNX Runtime), dynamic batch, metadata, refusals.

Models are untrained resnet18s at 64 px (32 px for the failure case) so each export takes seconds.
The mmfl preset exercises GeM pooling and the 3-stripe branch, whose adaptive windows do not
divide the 4-row map (the case the stock TorchScript exporter refuses).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfl.checkpoint import atomic_save, model_payload
from mmfl.hashing import file_sha256
from mmfl.cli import main
from mmfl.config import config_to_dict, load_config
from mmfl.errors import MMFLError
from mmfl.export import OnnxEmbedder, _adaptive_pooling_symbolics, export_onnx, read_onnx_meta
from mmfl.models import Prediction, build_model

ITEMS, ATTRS, CATS = 6, 4, 3


def _model(preset: str, size: int, categories: bool = True) -> torch.nn.Module:
    head = f"model.category_head={str(categories).lower()}"
    cfg = load_config(preset, ["model.backbone=resnet18", "model.pretrained=none", f"input.size={size}", head])
    model = build_model(cfg, ITEMS, ATTRS, CATS).eval()
    # non-trivial BatchNorm statistics, so the graph's folded BN is really checked
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    model.cfg_dict = config_to_dict(cfg)
    return model


def _checkpoint(model: torch.nn.Module, path: Path) -> Path:
    meta = {"config": model.cfg_dict, "num_items": ITEMS, "num_attributes": ATTRS, "num_categories": CATS,
            "attribute_names": [f"a{i}" for i in range(ATTRS)], "category_names": [f"c{i}" for i in range(CATS)]}
    atomic_save(model_payload(model, meta), path)
    return path


def test_cli_export_global_preset_matches_pytorch_at_any_batch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _model("global", 64)
    ckpt = _checkpoint(model, tmp_path / "model.pt")
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity vs PyTorch at batch 1/3" in printed and printed.strip().endswith("ok")

    embedder = OnnxEmbedder(out)
    assert embedder.size == 64 and embedder.embed_dim == model.embed_dim == 512
    assert embedder.meta["checkpoint_sha256"] == file_sha256(ckpt)
    assert embedder.meta["attribute_names"] == ["a0", "a1", "a2", "a3"]
    assert embedder.meta["config"]["input"]["size"] == 64
    x = torch.rand(5, 3, 64, 64)  # a batch size never seen at export or in the parity check
    before = x.clone()
    got = embedder.predict(x)
    with torch.inference_mode():
        ref = model.predict(x)
    assert isinstance(got, Prediction)
    assert torch.equal(x, before)
    assert got.embedding.shape == (5, 512)
    assert torch.allclose(got.embedding.norm(dim=1), torch.ones(5), atol=1e-5)
    assert (got.embedding - ref.embedding).abs().max() < 1e-4
    assert (got.attribute_logits - ref.attribute_logits).abs().max() < 1e-3
    assert (got.category_logits - ref.category_logits).abs().max() < 1e-3
    assert torch.allclose(embedder(x.numpy()), got.embedding)
    with pytest.raises(MMFLError, match=r"expects images of shape \(N, 3, 64, 64\)"):
        embedder.predict(torch.rand(1, 3, 48, 48))


def test_mmfl_preset_with_gem_and_uneven_stripes_exports(tmp_path: Path) -> None:
    model = _model("mmfl", 64, categories=False)
    poolings = {type(m).__name__ + ":" + m.kind for m in model.modules() if hasattr(m, "kind")}
    assert {"PartPool:gem", "PartPool:max"} <= poolings
    report = export_onnx(model, tmp_path / "mmfl.onnx", 64, opset=18)
    assert report["outputs"] == ["embedding", "attribute_logits"]
    assert report["batches"] == [1, 3]
    assert max(report["checked"].values()) < 1e-3
    embedder = OnnxEmbedder(tmp_path / "mmfl.onnx")
    x = torch.rand(2, 3, 64, 64)
    got = embedder.predict(x)
    with torch.inference_mode():
        ref = model.predict(x)
    assert got.embedding.shape == (2, 2304) and got.category_logits is None
    assert (got.embedding - ref.embedding).abs().max() < 1e-4


class _UnevenPools(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, (3, 1)).flatten(1), F.adaptive_avg_pool2d(x, (2, 3)).flatten(1),
                          F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)], dim=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter announces its retirement
@pytest.mark.parametrize("opset", [17, 18])
def test_adaptive_pooling_with_uneven_windows_exports_exactly(tmp_path: Path, opset: int) -> None:
    import onnxruntime as ort

    path = tmp_path / "pools.onnx"
    with _adaptive_pooling_symbolics(opset):
        torch.onnx.export(_UnevenPools(), (torch.rand(2, 4, 16, 16),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 4, 16, 16), (3, 4, 20, 7), (2, 4, 5, 5)]:  # windows of unequal, overlapping sizes
        x = torch.randn(*shape)
        (got,) = session.run(None, {"x": x.numpy()})
        assert np.abs(got - _UnevenPools()(x).numpy()).max() < 1e-6, shape


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(MMFLError, match="junk.onnx"):
        read_onnx_meta(junk)
    with pytest.raises(MMFLError, match="not found"):
        OnnxEmbedder(tmp_path / "missing.onnx")


class _NoisyNet(torch.nn.Module):
    """A model whose predict draws fresh noise on every call, so no export can match it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.embed_dim = inner, inner.embed_dim

    def predict(self, x: torch.Tensor) -> Prediction:
        p = self.inner.predict(x)
        return Prediction(p.embedding + 0.05 * torch.rand_like(p.embedding), None, None)


def test_parity_failure_raises_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(MMFLError, match="differs from PyTorch"):
        export_onnx(_NoisyNet(_model("global", 32, categories=False)), path, 32)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_searcher_with_onnx_matches_pytorch_and_refuses_other_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from PIL import Image

    from mmfl.checkpoint import load_model
    from mmfl.errors import GalleryIndexError
    from mmfl.index.search import Searcher
    from search_helpers import make_checkpoint, make_served_index

    index = make_served_index(tmp_path)
    graph = tmp_path / "model.onnx"
    export_onnx(load_model(tmp_path / "model.pt"), graph, 64)
    photo = Image.open(tmp_path / "gallery" / "id_03_consumer_2.png").convert("RGB")

    torch_searcher, onnx_searcher = Searcher(index), Searcher(index, onnx=graph)
    try:
        ref = torch_searcher.search(photo, k=5)["results"]
        got = onnx_searcher.search(photo, k=5)["results"]
    finally:
        torch_searcher.close()
        onnx_searcher.close()
    assert [r["item_id"] for r in got] == [r["item_id"] for r in ref]
    assert np.abs(np.array([r["score"] for r in got]) - [r["score"] for r in ref]).max() < 1e-4

    photo_path = str(tmp_path / "gallery" / "id_03_consumer_2.png")
    assert main(["search", str(index), photo_path, "--onnx", str(graph), "--top-k", "5", "--json"]) == 0
    assert [r["item_id"] for r in json.loads(capsys.readouterr().out)["results"]] == [r["item_id"] for r in ref]

    other = tmp_path / "other.onnx"
    export_onnx(load_model(make_checkpoint(tmp_path / "other.pt", seed=1)), other, 64)
    with pytest.raises(GalleryIndexError, match=r"other\.onnx \(exported from .*other\.pt\) has sha256"):
        Searcher(index, onnx=other)
    with pytest.raises(MMFLError, match="on CPU"):
        Searcher(index, device="cuda", onnx=graph)
    with pytest.raises(MMFLError, match="give one of them"):
        Searcher(index, checkpoint=tmp_path / "model.pt", onnx=graph)
