"""Finding the garment (issue 16): box head shapes, decoding on hand-made maps, targets that decode
back to their boxes, the box-choice rules, config errors, a tiny box stage on generated data that
beats a centred box, the checkpoint round trip, ``mmfl detect`` and the ONNX box graph."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfl.checkpoint import load_model, read_checkpoint
from mmfl.cli import main
from mmfl.config import ConfigError, load_config
from mmfl.data.box_dataset import box_images, make_targets
from mmfl.data.records import Record
from mmfl.errors import DataError, MMFLError
from mmfl.localise import Detection, choose_box, clamp_box, detect
from mmfl.models import build_model
from mmfl.models.box_head import BoxHead, BoxMaps, decode_boxes
from mmfl.synth import generate
from mmfl.train import train

#: What the tiny stage must reach on held-out generated photos (top box vs the given box).
IOU_FLOOR = 0.55
#: ... and by how much it must beat a centred box of the training boxes' mean size.
BASELINE_MARGIN = 0.1


def _maps(h: int, w: int, categories: int = 0) -> BoxMaps:
    return BoxMaps(torch.full((1, 1, h, w), -10.0), torch.zeros(1, 2, h, w), torch.zeros(1, 2, h, w),
                   torch.zeros(1, categories, h, w) if categories else None)


def test_decode_hand_made_peaks() -> None:
    """Two peaks on an 8x8 map of a 64x64 input (8 px cells): a stronger neighbour of a peak is the peak,
    a weaker neighbour is suppressed, and sizes/offsets/categories are read at the peak."""
    maps = _maps(8, 8, categories=3)
    maps.objectness[0, 0, 2, 3] = 5.0  # peak A
    maps.objectness[0, 0, 2, 4] = 4.0  # A's neighbour: no peak of its own
    maps.objectness[0, 0, 5, 1] = 3.0  # peak B
    maps.size[0, :, 2, 3] = torch.tensor([math.log(2.0), math.log(4.0)])  # 2 x 4 cells = 16 x 32 px
    maps.offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])
    maps.size[0, :, 5, 1] = 0.0  # 1 x 1 cell
    maps.offset[0, :, 5, 1] = torch.tensor([0.0, 1.0])
    maps.category[0, 2, 2, 3] = 5.0
    maps.category[0, 0, 5, 1] = 5.0
    out = decode_boxes(maps, (64, 64), max_boxes=3)
    assert out.boxes.shape == (1, 3, 4) and out.scores.shape == (1, 3)
    assert torch.allclose(out.boxes[0, 0], torch.tensor([20.0, 2.0, 36.0, 34.0]))  # centre (28, 18)
    assert torch.allclose(out.boxes[0, 1], torch.tensor([4.0, 44.0, 12.0, 52.0]))  # centre (8, 48)
    assert out.scores[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    assert out.scores[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert out.scores[0, 2] < 1e-4  # the flat background: no third garment
    assert out.categories[0, :2].tolist() == [2, 0]
    assert out.category_scores[0, 0] > 0.9


def test_decode_clamps_to_the_input_and_needs_no_categories() -> None:
    maps = _maps(4, 6)
    maps.objectness[0, 0, 0, 0] = 2.0
    maps.size[0, :, 0, 0] = 3.0  # e^3 = 20 cells: far beyond the 48 x 32 input
    out = decode_boxes(maps, (32, 48), max_boxes=50)  # more boxes asked than cells: all 24 cells
    assert out.boxes.shape == (1, 24, 4)
    assert out.boxes[0, 0].tolist() == [0.0, 0.0, 48.0, 32.0]
    assert out.categories[0, 0] == 0 and out.category_scores[0, 0] == 1.0


def test_targets_decode_back_to_their_boxes() -> None:
    """Maps that say exactly what the targets say decode to the boxes the targets were made from."""
    boxes = np.array([[10.0, 20.0, 50.0, 90.0], [60.0, 8.0, 90.0, 40.0]], np.float32)
    t = make_targets(boxes, [1, 0], size=96, grid=(6, 6))
    assert t["heatmap"].shape == (1, 6, 6) and t["heatmap"].max() == 1.0
    assert t["mask"].tolist()[:3] == [1.0, 1.0, 0.0] and t["category"].tolist()[:3] == [1, 0, -1]
    maps = _maps(6, 6, categories=2)
    for slot in range(2):
        row, col = divmod(int(t["index"][slot]), 6)
        maps.objectness[0, 0, row, col] = 5.0 - slot
        maps.size[0, :, row, col] = t["size"][slot]
        maps.offset[0, :, row, col] = t["offset"][slot]
        maps.category[0, int(t["category"][slot]), row, col] = 5.0
    out = decode_boxes(maps, (96, 96), max_boxes=2)
    assert torch.allclose(out.boxes[0], torch.from_numpy(boxes), atol=1e-3)
    assert out.categories[0].tolist() == [1, 0]


def test_box_images_group_boxes_by_photo() -> None:
    recs = [Record("a.jpg", "i1", "consumer", "train", (0, 0, 5, 5), "TOPS"),
            Record("a.jpg", "i2", "consumer", "train", (5, 5, 9, 9), "SKIRTS"),
            Record("a.jpg", "i1", "consumer", "train", (0, 0, 5, 5), "TOPS"),  # a repeat
            Record("b.jpg", "i3", "shop", "train", None, "TOPS")]  # no box: not used
    (only,) = box_images(recs, ["SKIRTS", "TOPS"])
    assert only.path == "a.jpg" and only.boxes == ((0, 0, 5, 5), (5, 5, 9, 9)) and only.categories == (1, 0)


def test_head_shapes_and_unchanged_embedding() -> None:
    """The head's maps have its map's size; a model built with it embeds exactly as one without."""
    head = BoxHead(32, 3, width=16)
    maps = head(torch.rand(2, 32, 5, 7))
    assert [tuple(t.shape) for t in maps] == [(2, 1, 5, 7), (2, 2, 5, 7), (2, 2, 5, 7), (2, 3, 5, 7)]
    assert BoxHead(32, 0).forward(torch.rand(1, 32, 4, 4)).category is None
    base = ["model.backbone=mobilenet_v2", "model.pretrained=none", "model.neck_width=32"]
    x = torch.rand(2, 3, 64, 64)
    embeddings = []
    for extra in ([], ["model.box_head=true"]):
        torch.manual_seed(0)
        model = build_model(load_config("mmfl", [*base, *extra]), 5, 0, 0, 4).eval()
        embeddings.append(model(x))
    assert torch.equal(embeddings[0], embeddings[1])
    with torch.inference_mode():
        found = model.detect(x, max_boxes=3)
    assert found.boxes.shape == (2, 3, 4) and found.categories.shape == (2, 3)
    assert float(found.boxes.min()) >= 0.0 and float(found.boxes.max()) <= 64.0


def test_choose_box_rules() -> None:
    found = [Detection((10, 10, 50, 60), "TOPS", 0.9, 0.8), Detection((0, 0, 20, 20), "SKIRTS", 0.5, 0.7)]
    box, reason = choose_box(found, (100, 80), user_box=(90, 70, 150, 120))  # the user's box wins, clamped
    assert box == (90, 70, 100, 80) and "user" in reason
    with pytest.raises(DataError, match="no area"):
        choose_box(found, (100, 80), user_box=(120, 90, 150, 120))
    assert choose_box(found, (100, 80), min_score=0.3) == ((10, 10, 50, 60), "predicted TOPS box (score 0.90)")
    box, reason = choose_box(found, (100, 80), min_score=0.95)
    assert box is None and "whole photo" in reason and "0.90" in reason
    box, reason = choose_box([], (100, 80))
    assert box is None and "no garment found" in reason
    assert clamp_box((-5.2, 3.4, 120.1, 79.5), 100, 80) == (0, 3, 100, 80)
    assert clamp_box((101.0, 3.0, 140.0, 9.0), 100, 80) is None


@pytest.mark.parametrize("override, key", [
    ("model.box_level=2", "model.box_level"), ("box.size=16", "box.size"), ("box.min_score=1.5", "box.min_score"),
    ("box.lr=0", "box.lr"), ("model.box_source=fused", "model.box_source"), ("box.epochs=-1", "box.epochs"),
    ("box.freeze_features=false model.freeze_stages=3", "box.freeze_features"),
])
def test_box_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config("global", ["model.box_head=true", *override.split()])
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def boxed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated data at 96 px and an untrained-retrieval checkpoint (ImageNet MobileNetV2) whose box
    head the box stage trained for 6 epochs on the training photos (both domains)."""
    root = tmp_path_factory.mktemp("boxdata")
    generate(root / "data", items=36, seed=5, size=96)
    cfg = load_config("global", [
        f"data.root={root / 'data'}", f"output_dir={root / 'run'}", "model.backbone=mobilenet_v2",
        "model.pretrained=imagenet", "input.size=64", "train.epochs=0", "data.num_workers=0",
        "train.tensorboard=false", "model.box_head=true", "box.size=96", "box.epochs=6", "box.batch_size=16",
        "box.lr=3e-3",
    ])
    torch.manual_seed(0)
    result = train(cfg, progress=False)
    return {"root": root, "cfg": cfg, "checkpoint": result.last_checkpoint}


def test_tiny_box_stage_learns_boxes(boxed_run: dict) -> None:
    """On held-out photos the top box overlaps the given box well above a centred box's overlap."""
    metrics = read_checkpoint(boxed_run["checkpoint"])["box_metrics"]
    base = metrics["centred_baseline"]
    assert metrics["images"] > 20
    assert metrics["mean_iou"] > IOU_FLOOR, metrics
    assert metrics["mean_iou"] > base["mean_iou"] + BASELINE_MARGIN, metrics
    assert metrics["iou50"] > base["iou50"]


def test_checkpoint_carries_the_head_and_keeps_retrieval_weights(boxed_run: dict) -> None:
    """The stage froze the features: every retrieval weight is what the same seed builds without a head."""
    model = load_model(boxed_run["checkpoint"])
    assert model.box_head is not None and model.meta["box_category_names"]
    stored = read_checkpoint(boxed_run["checkpoint"])
    cfg = boxed_run["cfg"]
    torch.manual_seed(cfg.seed)
    plain = build_model(load_config("global", [f"data.root={cfg.data.root}", "model.backbone=mobilenet_v2",
                                               "model.pretrained=imagenet"]),
                        stored["num_items"], stored["num_attributes"])
    for name, value in plain.state_dict().items():
        assert torch.equal(stored["model"][name], value), name


def test_detect_maps_boxes_to_the_photo(boxed_run: dict) -> None:
    """A photo twice the size of the training photos gets boxes in its own pixels, clamped to it."""
    model = load_model(boxed_run["checkpoint"])
    photo = next((boxed_run["root"] / "data" / "img").rglob("comsumer_01.jpg"))
    image = Image.open(photo).convert("RGB").resize((192, 160))
    found = detect(model, image, max_boxes=4)
    assert found and all(0 <= d.box[0] < d.box[2] <= 192 and 0 <= d.box[1] < d.box[3] <= 160 for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert all(d.category in model.meta["box_category_names"] for d in found)


def test_detect_command_table_json_and_bad_files(boxed_run: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    photo = str(next((boxed_run["root"] / "data" / "img").rglob("comsumer_01.jpg")))
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    assert main(["detect", str(boxed_run["checkpoint"]), photo, "--min-score", "0.05"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"{photo} 96x96: ") and "rank  score  category" in table
    assert main(["detect", str(boxed_run["checkpoint"]), photo, str(junk), "--json", "--max-boxes", "2"]) == 2
    out, err = capsys.readouterr()
    answers = json.loads(out)
    assert len(answers[0]["detections"]) <= 2 and answers[0]["reason"]
    assert "cannot decode" in answers[1]["error"]
    assert err.count("\n") == 1 and err.startswith(f"error: {junk}")


def test_detect_refuses_a_checkpoint_without_head(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  boxed_run: dict) -> None:
    cfg = load_config("global", [f"data.root={boxed_run['root'] / 'data'}", f"output_dir={tmp_path}",
                                 "model.backbone=mobilenet_v2", "model.pretrained=none", "input.size=64",
                                 "train.epochs=0", "data.num_workers=0", "train.tensorboard=false"])
    ckpt = train(cfg, progress=False).last_checkpoint
    photo = str(next((boxed_run["root"] / "data" / "img").rglob("comsumer_01.jpg")))
    assert main(["detect", str(ckpt), photo]) == 2
    assert "has no box head" in capsys.readouterr().err


def test_onnx_box_graph_matches_pytorch(boxed_run: dict, tmp_path: Path) -> None:
    """The box graph passes its parity check, and the ONNX detector gives ``detect`` the same boxes
    as the checkpoint. (``mmfl export`` writes it beside the embedding graph as ``NAME.boxes.onnx``.)"""
    from mmfl.export import OnnxBoxDetector, box_graph_path, export_box_onnx

    model = load_model(boxed_run["checkpoint"])
    graph = box_graph_path(tmp_path / "model.onnx")
    assert graph == tmp_path / "model.boxes.onnx"
    report = export_box_onnx(model, graph, 96, max_boxes=10)
    assert max(report["checked"].values()) <= report["tolerance"] and graph.is_file()
    onnx_model = OnnxBoxDetector(graph)
    photo = next((boxed_run["root"] / "data" / "img").rglob("comsumer_02.jpg"))
    image = Image.open(photo).convert("RGB")
    ours, theirs = detect(model, image, min_score=0.05), detect(onnx_model, image, min_score=0.05)
    assert [d.box for d in ours] == [d.box for d in theirs]
    assert [d.category for d in ours] == [d.category for d in theirs]


def test_box_head_without_boxes_is_refused_before_training(boxed_run: dict, tmp_path: Path) -> None:
    """A CSV without box columns cannot train a box head: one line naming the data, before any write."""
    photos = sorted((boxed_run["root"] / "data" / "img").rglob("*.jpg"))[:8]
    rows = [f"{p},item{i // 2},{'shop' if i % 2 else 'consumer'},train" for i, p in enumerate(photos)]
    (tmp_path / "dataset.csv").write_text("path,item_id,domain,split\n" + "\n".join(rows) + "\n")
    cfg = load_config("global", [f"data.root={tmp_path / 'dataset.csv'}", "data.format=csv",
                                 f"output_dir={tmp_path / 'run'}", "model.backbone=mobilenet_v2",
                                 "model.pretrained=none", "model.box_head=true", "train.epochs=0",
                                 "data.num_workers=0", "train.tensorboard=false"])
    with pytest.raises(MMFLError, match="no photo of split 'train' has a box") as err:
        train(cfg, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
