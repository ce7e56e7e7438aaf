"""``data.decode=gpu``: JPEGs decoded and augmented as batched device ops (mmfl.data.gpu_decode), run on the CPU device.

The device path takes its device as an argument, so everything but nvJPEG itself runs here:
crops, EXIF orientation and boxes against the PIL path, the augmentation's draws and colour maps
against the CPU transforms, the trainer's and the extractor's use of it, and the fallback to the
CPU loader (with its one notice line) on a machine without CUDA.

Tolerances: on the CPU both paths decode with libjpeg-turbo, so the crops are equal; nvJPEG
differs from it by about a grey level, so model inputs are compared at a mean absolute
difference under 2/255 (with ``min_size`` the CPU path decodes at a reduced DCT scale, which
alone differs by ~0.5/255 on average at these sizes).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mmfl.config import load_config
from mmfl.data.dataset import EncodedRecordDataset, RecordDataset
from mmfl.data.gpu_decode import (
    ERASE_VALUE,
    JITTER_OPS,
    TrainAugment,
    collate_encoded,
    decode_crops,
    eval_images,
    jitter_maps,
    pick_decode_device,
    random_resized_crop,
)
from mmfl.data.images import check_box, open_crop
from mmfl.data.records import Record
from mmfl.data.sampler import PKSampler
from mmfl.data.transforms import CROP_RATIO, ColorJitterAffine, eval_transform, train_source_size, train_transform
from mmfl.errors import DataError
from mmfl.extract import extract_features
from mmfl.losses import build_criterion
from mmfl.models import build_model
from mmfl.synth import generate
from mmfl.train.step import Batch, TrainStep
from mmfl.train.trainer import build_optimizer, prepare_data, train_batches, train_dataset

CPU = torch.device("cpu")
#: Model inputs: mean absolute difference between the device path and the CPU path, in [0, 1] units.
MEAN_TOL = 2 / 255
NOTICE = "data.decode=gpu: no CUDA device; decoding on the CPU workers"
TINY = ["model.backbone=resnet18", "model.pretrained=none", "input.size=64", "train.batch_items=4",
        "train.images_per_item=4", "data.num_workers=0", "train.tensorboard=false", "train.warmup_epochs=0",
        "model.neck_width=64"]


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour fields and two sharp shapes, left/right and top/bottom asymmetric (orientation shows)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    rgb[(x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.02] = (0.9, 0.1, 0.1)
    rgb[(np.abs(x - 0.7) < 0.1) & (np.abs(y - 0.5) < 0.2)] = (0.1, 0.1, 0.8)
    return Image.fromarray((rgb * 255).astype(np.uint8)).convert(mode)


def save_jpeg(img: Image.Image, path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """Eight EXIF orientations with a box, a PNG, a CMYK and a greyscale JPEG, one box partly outside."""
    root = tmp_path_factory.mktemp("gpu_decode")
    records = [Record(str(save_jpeg(photo(480, 360), root / f"o{o}.jpg", o)), f"o{o}", "shop", "train",
                      box=(40, 30, 300, 330)) for o in range(1, 9)]
    photo(300, 200).save(root / "p.png")
    photo(300, 200, "CMYK").save(root / "cmyk.jpg", "JPEG", quality=95)
    photo(300, 200, "L").save(root / "grey.jpg", "JPEG", quality=95)
    records += [Record(str(root / "p.png"), "png", "shop", "train", box=(10, 10, 200, 150)),
                Record(str(root / "cmyk.jpg"), "cmyk", "shop", "train"),
                Record(str(root / "grey.jpg"), "grey", "consumer", "train", box=(-20, 50, 250, 400))]
    return records


def _batch(records: list[Record], min_size: int = 0):
    dataset = EncodedRecordDataset(records, min_size=min_size)
    return collate_encoded([dataset[i] for i in range(len(records))])


def test_crops_are_the_pil_crops_for_every_orientation_and_box(images: list[Record]) -> None:
    batch = _batch(images)
    # JPEGs the device can decode travel as bytes; PNG and CMYK are decoded by the worker
    assert [m.pixels is None for m in batch.metas] == [True] * 8 + [False, False, True]
    crops = decode_crops(batch, CPU)
    for rec, meta, crop in zip(images, batch.metas, crops):
        want, full = open_crop(rec.path, rec.box, None)
        if meta.pixels is None:  # the same clamped box, in upright coordinates
            assert meta.box == (check_box(rec.box, *full, rec.path) if rec.box else (0, 0, *full))
        want_t = torch.from_numpy(np.array(want)).permute(2, 0, 1)
        assert crop.shape == want_t.shape, rec.path
        assert (crop.float() - want_t.float()).abs().mean() < MEAN_TOL * 255, rec.path


def test_eval_images_match_the_cpu_loader(images: list[Record]) -> None:
    size = 64
    cpu = RecordDataset(images, eval_transform(size), min_size=size)
    device = eval_images(_batch(images, min_size=size), size, CPU)
    assert device.shape == (len(images), 3, size, size) and device.dtype == torch.float32
    for i, rec in enumerate(images):
        assert (device[i] - cpu[i][0]).abs().mean() < MEAN_TOL, rec.path


def test_train_path_without_random_ops_matches_the_cpu_transform(images: list[Record]) -> None:
    """Scale 1, no flip, jitter or erasing: both paths resize the whole box (its aspect is within the crop ratios)."""
    size, square = 48, [r for r in images if r.box == (40, 30, 300, 330)]  # 260 x 300: inside 3/4..4/3
    cpu = RecordDataset(square, train_transform(size, False, 1.0, 0.0, 0.0), min_size=train_source_size(size, 1.0))
    aug = TrainAugment(size, flip=False, crop_scale_min=1.0, color_jitter=0.0, random_erasing=0.0)
    out = aug(decode_crops(_batch(square), CPU), random.Random(0))
    assert out.dtype == torch.uint8 and out.shape == (len(square), 3, size, size)
    for i in range(len(square)):
        assert (out[i].float() - cpu[i][0].float()).abs().mean() < MEAN_TOL * 255


def test_jitter_maps_are_color_jitter_affines_maps() -> None:
    """A @ rgb + T @ mean + c equals ColorJitterAffine.compose's map for that mean, for any order and subset."""
    rng = np.random.default_rng(0)
    n = 64
    ops = np.full((n, 4), -1)
    factors = np.zeros((n, 4))
    for i in range(n):
        order = rng.permutation(4)[: rng.integers(0, 5)]
        ops[i, : len(order)] = order
        factors[i, : len(order)] = [rng.uniform(-0.5, 0.5) if op == 3 else rng.uniform(0.5, 1.5) for op in order]
    a, t, c = jitter_maps(ops, factors)
    for i in range(n):
        order = [JITTER_OPS[op] for op in ops[i] if op >= 0]
        mean = torch.tensor(rng.uniform(0, 255, 3))
        want_a, want_t = ColorJitterAffine.compose(order, {k: factors[i, j] for j, k in enumerate(order)}, mean)
        assert np.allclose(a[i], want_a.numpy(), atol=1e-12)
        assert np.allclose(t[i] @ mean.numpy() + c[i], want_t.numpy(), atol=1e-9)


def test_device_jitter_is_pils_colour_map_within_a_grey_level() -> None:
    """The same draw applied on the device and by PIL (``Image.convert`` with the matrix) differs by rounding only."""
    size = 40
    img = photo(size, size)
    aug = TrainAugment(size, flip=False, crop_scale_min=1.0, color_jitter=0.4, random_erasing=0.0)
    rng = random.Random(3)
    _, table = aug.draw([(size, size)], rng)
    crop = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    out = aug.apply([crop], [(0, 0, size, size)], table)[0]
    a, t, c = (table[0, 1:10].view(3, 3), table[0, 10:19].view(3, 3), table[0, 19:22])
    mean = crop.double().mean(dim=(1, 2))
    shift = t @ mean + c
    matrix = tuple(torch.cat([a, shift.unsqueeze(1)], dim=1).flatten().tolist())
    want = torch.from_numpy(np.array(img.convert("RGB", matrix))).permute(2, 0, 1)
    assert (out.int() - want.int()).abs().max() <= 1
    assert not torch.equal(want, crop)  # the draw did change the colours


def test_random_crops_stay_in_the_box_and_follow_torchvisions_sampling() -> None:
    scale_min = 0.4
    rng = random.Random(0)
    for h, w in [(300, 200), (120, 500), (90, 90), (1, 40), (640, 480)]:
        fractions, aspects, tv_fractions, tv_aspects = [], [], [], []
        torch.manual_seed(0)
        for _ in range(1500):
            top, left, ch, cw = random_resized_crop(h, w, (scale_min, 1.0), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
            fractions.append(ch * cw / (h * w))
            aspects.append(cw / ch)
            _, _, th, tw = RandomResizedCrop.get_params(torch.empty(1, h, w), (scale_min, 1.0), CROP_RATIO)
            tv_fractions.append(th * tw / (h * w))
            tv_aspects.append(tw / th)
        if CROP_RATIO[0] <= w / h <= CROP_RATIO[1]:  # else the fallback crop (as torchvision's) may be smaller
            assert min(fractions) >= scale_min - (h + w + 1) / (h * w)  # a pixel of rounding each way
        assert abs(np.mean(fractions) - np.mean(tv_fractions)) < 0.02, (h, w)
        assert abs(np.mean(aspects) - np.mean(tv_aspects)) < 0.03 * np.mean(tv_aspects), (h, w)


def test_same_seed_same_augmentation_and_windows_inside_each_box(images: list[Record]) -> None:
    batch = _batch(images[:8])
    crops = decode_crops(batch, CPU)
    aug = TrainAugment(32)
    sizes = [m.crop_size for m in batch.metas]
    (w1, t1), (w2, t2), (w3, _) = (aug.draw(sizes, random.Random(seed)) for seed in (5, 5, 6))
    assert w1 == w2 and torch.equal(t1, t2) and w1 != w3
    assert torch.equal(aug.apply(crops, w1, t1), aug.apply(crops, w2, t2))
    for meta, (top, left, h, w) in zip(batch.metas, w1):
        x1, y1, x2, y2 = meta.box
        assert x1 <= x1 + left and x1 + left + w <= x2 and y1 <= y1 + top and y1 + top + h <= y2


def test_flip_and_random_erasing_act_where_drawn(images: list[Record]) -> None:
    crops = decode_crops(_batch(images[:4]), CPU)
    size = 32
    aug = TrainAugment(size, flip=True, crop_scale_min=0.5, color_jitter=0.0, random_erasing=1.0)
    windows, table = aug.draw([(c.shape[1], c.shape[2]) for c in crops], random.Random(1))
    plain = table.clone()
    plain[:, 0], plain[:, 22:26] = 0, 0
    base = aug.apply(crops, windows, plain)
    flipped = plain.clone()
    flipped[:, 0] = 1
    assert torch.equal(aug.apply(crops, windows, flipped), base.flip(-1))
    erased = plain.clone()
    erased[:, 22:26] = table[:, 22:26]
    out = aug.apply(crops, windows, erased)
    for i, (top, left, h, w) in enumerate(table[:, 22:26].long().tolist()):
        assert h > 0 and 0.02 * 0.9 <= h * w / size**2 <= 0.33 * 1.1  # p = 1: every image has a box
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert (out[i][:, inside] == ERASE_VALUE).all()
        assert torch.equal(out[i][:, ~inside], base[i][:, ~inside])


def test_bad_files_fail_with_the_cpu_paths_one_line(tmp_path: Path) -> None:
    good = save_jpeg(photo(64, 64), tmp_path / "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    records = [Record(str(good), "a", "shop", "train"), Record(str(cut), "b", "shop", "train")]
    batch = _batch(records)  # the header of a truncated JPEG reads fine: the decoder finds it
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image") as err:
        decode_crops(batch, CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        EncodedRecordDataset([Record(str(tmp_path / "absent.jpg"), "c", "shop", "train")])[0]
    with pytest.raises(DataError, match="no area"):
        EncodedRecordDataset([Record(str(good), "d", "shop", "train", box=(70, 70, 90, 90))])[0]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, items=24, seed=5, size=64)
    return root


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is taken only without CUDA")
def test_gpu_choice_without_cuda_takes_the_cpu_path_with_at_most_one_notice(capsys: pytest.CaptureFixture[str]) -> None:
    """At most one line per process (an earlier test may have printed it; the training test below
    counts it in a new process)."""
    assert [pick_decode_device(c, CPU) for c in ("gpu", "gpu", "cpu", "gpu")] == [None] * 4
    assert capsys.readouterr().err.splitlines() in ([], [NOTICE])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is taken only without CUDA")
def test_training_with_gpu_decode_falls_back_once_and_equals_the_cpu_run(synth_root: Path, tmp_path: Path) -> None:
    """Without CUDA, data.decode=gpu trains exactly as data.decode=cpu (deterministic mode, the same
    losses and validation metrics), and says so in one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        cmd = [sys.executable, "-m", "mmfl.cli", "train", "--config", "global", "--no-progress",
               f"data.root={synth_root}", f"output_dir={out}", *TINY, "train.deterministic=true", "train.epochs=1", "train.max_steps_per_epoch=3",
               "train.eval_every=1", f"data.decode={decode}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs[decode] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert proc.stderr.count(NOTICE) == (decode == "gpu"), proc.stderr
    losses = {k: [row["loss"] for row in rows if row["kind"] == "epoch"] for k, rows in runs.items()}
    assert all(math.isfinite(x) for x in losses["gpu"]) and losses["gpu"] == losses["cpu"]
    assert [r for r in runs["gpu"] if r["kind"] == "eval"] == [r for r in runs["cpu"] if r["kind"] == "eval"]


def test_trainer_batches_decoded_on_the_device_feed_the_training_step(synth_root: Path, tmp_path: Path) -> None:
    """The trainer's own loader with decode_device=cpu: the CPU loader's items and labels, repeatable
    images of the training size, and a training step that runs on them."""
    cfg = load_config("global", [f"data.root={synth_root}", f"output_dir={tmp_path}", *TINY])
    data = prepare_data(cfg)
    sampler = PKSampler([r.item_id for r in data.records], [r.domain for r in data.records], 4, 4, seed=0)
    sampler.set_epoch(0)
    def first_two(decode_device: torch.device | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = train_batches(cfg, train_dataset(cfg, data, decode_device), sampler, CPU, 0, decode_device)
        assert len(batches) == len(sampler) >= 2
        return list(itertools.islice(batches, 2))

    on_device, again, on_cpu = first_two(CPU), first_two(CPU), first_two(None)
    for (images, labels, index), (images2, _, _), (cpu_images, cpu_labels, cpu_index) in zip(on_device, again, on_cpu):
        assert images.dtype == cpu_images.dtype == torch.uint8 and images.shape == cpu_images.shape == (16, 3, 64, 64)
        assert torch.equal(labels, cpu_labels) and torch.equal(index, cpu_index)
        assert torch.equal(images, images2)
    model = build_model(cfg, data.num_items, len(data.catalog.attribute_names), 0)
    criterion = build_criterion(cfg, data.num_items, cfg.model.branches[0].dim)
    step = TrainStep(model, criterion, build_optimizer(cfg, model, CPU), None, device=CPU, amp=False, grad_clip=5.0)
    model.train()
    for images, labels, index in on_device:
        attrs = data.attributes[labels] if data.attributes.shape[1] else None
        terms = step(Batch(images, labels, data.record_domains[index], attrs).to(CPU))
        assert math.isfinite(float(terms["total"]))


def test_extraction_on_the_device_path_matches_the_cpu_path(synth_root: Path) -> None:
    cfg = load_config("global", [*TINY, "model.branches=[{name: global, level: 5, partition: whole, dim: 32}]"])
    torch.manual_seed(0)
    model = build_model(cfg, num_items=6, num_attributes=0).eval()
    records = prepare_data(load_config("global", [f"data.root={synth_root}", *TINY])).records[:20]
    cpu = extract_features(model, records, 64, batch_size=8, progress=False)
    dev = extract_features(model, records, 64, batch_size=8, progress=False, decode_device=CPU)
    cosine = F.cosine_similarity(cpu.embeddings, dev.embeddings)
    assert cosine.shape == (20,) and cosine.min() > 0.99, cosine


def test_the_decode_key_is_checked() -> None:
    from mmfl.config import ConfigError

    assert load_config("global", ["data.decode=gpu", "model.pretrained=none"]).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode"):
        load_config("global", ["data.decode=nvjpeg", "model.pretrained=none"])


def test_a_device_batch_holds_the_bytes_in_one_block(images: list[Record]) -> None:
    batch = _batch(images)
    assert batch.payload.dtype == torch.uint8 and batch.payload.dim() == 1
    first = Path(images[0].path).read_bytes()
    assert bytes(batch.data(0).numpy()) == first and len(batch) == len(images)
    png_h, png_w = batch.metas[8].pixels
    assert batch.data(8).numel() == png_h * png_w * 3
    assert io.BytesIO(bytes(batch.data(1).numpy())).read(2) == b"\xff\xd8"  # a JPEG's start-of-image marker


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")


@needs_cuda
def test_nvjpeg_on_cuda_gives_the_cpu_paths_crops_and_inputs(images: list[Record]) -> None:
    """nvJPEG against libjpeg-turbo: the same boxes, model inputs within the stated tolerance (GPU session only)."""
    cuda = torch.device("cuda")
    assert pick_decode_device("gpu", cuda) == cuda
    batch = _batch(images, min_size=64)
    for on_gpu, on_cpu in zip(decode_crops(batch, cuda), decode_crops(batch, CPU)):
        assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
        assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < MEAN_TOL * 255
    cpu = RecordDataset(images, eval_transform(64), min_size=64)
    inputs = eval_images(batch, 64, cuda).cpu()
    for i in range(len(images)):
        assert (inputs[i] - cpu[i][0]).abs().mean() < MEAN_TOL
    aug = TrainAugment(64)
    windows, table = aug.draw([m.crop_size for m in batch.metas], random.Random(0))
    on_gpu = aug.apply(decode_crops(batch, cuda), windows, table).cpu()
    on_cpu = aug.apply(decode_crops(batch, CPU), windows, table)
    assert (on_gpu.float() - on_cpu.float()).abs().mean() < MEAN_TOL * 255


@needs_cuda
def test_training_with_gpu_decode_on_cuda(synth_root: Path, tmp_path: Path) -> None:
    from mmfl.train import train

    cfg = load_config("global", [f"data.root={synth_root}", f"output_dir={tmp_path}", *TINY, "train.epochs=1",
                                 "train.max_steps_per_epoch=3", "train.eval_every=1", "data.decode=gpu",
                                 "train.device=cuda"])
    result = train(cfg, progress=False)
    (epoch,) = [row for row in result.history if row["kind"] == "epoch"]
    assert math.isfinite(epoch["loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is taken only without CUDA")
def test_eval_and_index_take_decode_gpu_and_fall_back_with_one_notice(synth_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``mmfl eval/index --decode gpu`` reach the device path's chooser: without CUDA one notice and the
    CPU path's exact results."""
    from mmfl.cli import main
    from mmfl.data import gpu_decode
    from mmfl.train import train

    monkeypatch.setattr(gpu_decode, "_noticed", set())  # the notice is once per process: as if this were a new one

    checkpoint = train(load_config("global", [f"data.root={synth_root}", f"output_dir={tmp_path / 'run'}", *TINY,
                                              "train.epochs=0"]), progress=False).last_checkpoint
    common = ["--data", str(synth_root), "--workers", "0", "--device", "cpu", "--no-progress"]
    results, counts = {}, {}
    for decode in ("cpu", "gpu"):
        assert main(["eval", str(checkpoint), *common, "--decode", decode, "--json", str(tmp_path / f"{decode}.json")]) == 0
        assert main(["index", str(checkpoint), *common, "--format", "deepfashion-c2s", "--decode", decode, "--out", str(tmp_path / f"index-{decode}")]) == 0
        err = capsys.readouterr().err
        assert err.count(NOTICE) == (decode == "gpu"), err
        results[decode] = json.loads((tmp_path / f"{decode}.json").read_text())
        counts[decode] = json.loads((tmp_path / f"index-{decode}" / "manifest.json").read_text())["count"]
    assert results["gpu"]["top1"] == results["cpu"]["top1"] and results["gpu"]["mAP"] == results["cpu"]["mAP"]
    assert counts["gpu"] == counts["cpu"] > 0
