"""Feature extraction, the evaluation protocol on a tiny catalog, plots and ``mmfl eval``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfl.checkpoint import atomic_save, model_payload
from mmfl.cli import main
from mmfl.config import config_to_dict, load_config
from mmfl.data.records import Catalog, Record
from mmfl.data.transforms import eval_transform
from mmfl.errors import DataError
from mmfl.evaluate import run_evaluation
from mmfl.extract import extract_features
from mmfl.models import build_model
from mmfl.plots import plot_cmc, plot_ranked_grid

SIZE = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"top1", "top5", "top10", "top20", "top50", "mAP", "num_queries", "num_gallery",
               "num_queries_without_match"}


def tiny_config():
    return load_config("global", [
        "model.backbone=resnet18", "model.pretrained=none", f"input.size={SIZE}", "model.category_head=true",
        "model.branches=[{name: global, level: 5, partition: whole, pooling: avg, dim: 32}]",
    ])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(), num_items=6, num_attributes=3, num_categories=2).eval()


def photo(path: Path, seed: int) -> str:
    """A left/right asymmetric JPEG (two colours plus a band), so its mirror image differs."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((48, 40, 3), np.uint8)
    pixels[:, :20] = rng.integers(0, 256, 3)
    pixels[:, 20:] = rng.integers(0, 256, 3)
    pixels[int(rng.integers(8, 40)):, : int(rng.integers(5, 35))] = rng.integers(0, 256, 3)
    Image.fromarray(pixels).save(path, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str, str, str, str]]]:
    """Rows (path, item, domain, split, category) of a tiny consumer-to-shop set.

    Test split: items it0..it2 have a shop image that IS their consumer photo (a certain top-1 hit)
    plus another shop image; it3 has only a different shop image; it4 has no shop image at all
    (a query without a match). The val split adds one shop image; train has one pair.
    """
    root = tmp_path_factory.mktemp("tiny")
    rows: list[tuple[str, str, str, str, str]] = []
    categories = {"it0": "upper", "it1": "upper", "it2": "lower", "it3": "lower", "it4": "upper", "it5": "lower"}
    for i in range(5):
        item = f"it{i}"
        consumer = photo(root / f"c{i}.jpg", seed=10 * i)
        rows.append((consumer, item, "consumer", "test", categories[item]))
        if i < 3:
            rows.append((consumer, item, "shop", "test", categories[item]))
        if i < 4:
            rows.append((photo(root / f"s{i}.jpg", seed=10 * i + 1), item, "shop", "test", categories[item]))
    rows.append((photo(root / "v5.jpg", seed=51), "it5", "shop", "val", "lower"))
    rows.append((photo(root / "t6c.jpg", seed=61), "it6", "consumer", "train", "upper"))
    rows.append((photo(root / "t6s.jpg", seed=62), "it6", "shop", "train", "upper"))
    return root, rows


def catalog_of(rows: list[tuple[str, str, str, str, str]]) -> Catalog:
    records = [Record(path=p, item_id=i, domain=d, split=s, category=c, source=f"test:{n}")
               for n, (p, i, d, s, c) in enumerate(rows, start=1)]
    return Catalog(records=records, category_names=["lower", "upper"], name="tiny")


# --- extraction ---------------------------------------------------------------------------------

def test_embeddings_are_unit_norm_and_flip_is_deterministic(model, dataset) -> None:
    records = catalog_of(dataset[1]).records[:5]
    plain = extract_features(model, records, SIZE, batch_size=2, progress=False)
    assert plain.embeddings.shape == (5, model.embed_dim) and plain.embeddings.dtype == torch.float32
    assert torch.allclose(plain.embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    assert plain.attribute_probs is None and plain.category_probs is None
    flipped = extract_features(model, records, SIZE, batch_size=3, flip=True, progress=False)
    again = extract_features(model, records, SIZE, batch_size=3, flip=True, progress=False)
    assert torch.equal(flipped.embeddings, again.embeddings)
    assert (plain.embeddings - flipped.embeddings).abs().max() > 1e-3
    assert torch.allclose(flipped.embeddings.norm(dim=1), torch.ones(5), atol=1e-5)


def test_flip_is_the_mean_of_both_views_and_input_is_untouched(model, dataset) -> None:
    records = catalog_of(dataset[1]).records[:3]
    images = torch.stack([eval_transform(SIZE)(Image.open(r.path).convert("RGB")) for r in records])
    before = images.clone()
    with torch.inference_mode():
        expected = F.normalize(model(images) + model(images.flip(-1)), dim=1)
    assert torch.equal(images, before)  # the model normalises into a new tensor
    got = extract_features(model, records, SIZE, flip=True, progress=False).embeddings
    assert torch.allclose(got, expected, atol=1e-5)


def test_predictions_and_training_mode_restored(model, dataset) -> None:
    records = catalog_of(dataset[1]).records[:4]
    model.train()
    try:
        feats = extract_features(model, records, SIZE, predictions=True, flip=True, progress=False)
        assert model.training  # extraction switched to eval and back
    finally:
        model.eval()
    assert feats.attribute_probs.shape == (4, 3)
    assert ((feats.attribute_probs > 0) & (feats.attribute_probs < 1)).all()
    assert torch.allclose(feats.category_probs.sum(1), torch.ones(4), atol=1e-5)
    plain = extract_features(model, records, SIZE, flip=True, progress=False)
    assert torch.allclose(feats.embeddings, plain.embeddings, atol=1e-6)


# --- evaluation ---------------------------------------------------------------------------------

def test_evaluate_tiny_catalog(model, dataset) -> None:
    catalog = catalog_of(dataset[1])
    ev = run_evaluation(model, catalog, split="test", size=SIZE, batch_size=4, progress=False)
    m = ev.metrics
    assert METRIC_KEYS <= set(m)
    assert (m["num_queries"], m["num_queries_without_match"], m["num_gallery"]) == (4, 1, 7)
    assert ev.ranks.first_hit[:3].tolist() == [0, 0, 0]  # a query's own photo in the gallery ranks first
    assert m["top1"] >= 0.75 and m["top10"] == 1.0  # 7 gallery images: every match is in the top 10
    assert all(0.0 <= m[k] <= 1.0 for k in ("top1", "top5", "top10", "top20", "top50", "mAP"))
    assert (m["split"], m["gallery_splits"], m["flip"], m["rerank"]) == ("test", ["test"], False, False)
    per = m["per_category"]
    assert list(per) == ["lower", "upper"]
    assert (per["upper"]["num_queries"], per["upper"]["num_queries_without_match"], per["upper"]["top1"]) == (2, 1, 1.0)
    assert per["lower"]["num_queries"] == 2 and per["lower"]["num_queries_without_match"] == 0


def test_gallery_splits_flip_and_rerank_are_recorded(model, dataset) -> None:
    catalog = catalog_of(dataset[1])
    m = run_evaluation(model, catalog, split="test", gallery_splits=["test", "val"], size=SIZE, flip=True,
                       rerank=True, progress=False).metrics
    assert m["num_gallery"] == 8 and m["gallery_splits"] == ["test", "val"]
    assert m["flip"] is True and m["rerank"] is True
    assert all(0.0 <= m[k] <= 1.0 for k in ("top1", "mAP"))


@pytest.mark.parametrize("rerank", [False, True])
def test_top_ranked_agrees_with_the_metrics(model, dataset, rerank: bool) -> None:
    ev = run_evaluation(model, catalog_of(dataset[1]), size=SIZE, rerank=rerank, progress=False)
    rows = ev.sample_queries(8)
    assert rows == [0, 1, 2, 3]  # the four queries with a match, query 4 has none
    ranked, hits = ev.top_ranked(rows, top=7)
    first = [int(np.flatnonzero(h)[0]) for h in hits]
    assert first == ev.ranks.first_hit[rows].tolist()
    assert all(ev.gallery[g].item_id == ev.queries[r].item_id for r, g, h in zip(rows, ranked[:, 0], hits[:, 0]) if h)


def test_within_category_searches_own_category_gallery(model, dataset) -> None:
    m = run_evaluation(model, catalog_of(dataset[1]), size=SIZE, within_category=True, progress=False).metrics
    assert m["within_category"] is True
    assert m["per_category"]["upper"]["num_gallery"] == 4 and m["per_category"]["lower"]["num_gallery"] == 3
    assert m["per_category"]["upper"]["top1"] == 1.0


def test_wrong_split_names_are_data_errors(model, dataset) -> None:
    catalog = catalog_of(dataset[1])
    with pytest.raises(DataError, match="split 'validation' has no consumer"):
        run_evaluation(model, catalog, split="validation", size=SIZE, progress=False)
    with pytest.raises(DataError, match="no consumer image of split 'train' has a shop image"):
        run_evaluation(model, catalog, split="train", gallery_splits=["val"], size=SIZE, progress=False)


def test_plots_write_pngs(tmp_path: Path, dataset) -> None:
    records = catalog_of(dataset[1]).records
    cmc = plot_cmc({"all": np.linspace(0.2, 1.0, 50), "upper": np.linspace(0.1, 0.9, 50)}, tmp_path / "c.png")
    queries, gallery = records[:2], records[2:6]
    grid = plot_ranked_grid(queries, gallery, np.array([[0, 1, 2], [3, 2, 1]]),
                            np.array([[True, False, False], [False, True, False]]), tmp_path / "g" / "r.png", top=3)
    for path in (cmc, grid):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


# --- CLI ------------------------------------------------------------------------------------------

def write_csv(rows: list[tuple[str, str, str, str, str]], path: Path) -> Path:
    lines = ["path,item_id,domain,split,category"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    meta = {"config": config_to_dict(tiny_config()), "num_items": 6, "num_attributes": 3, "num_categories": 2,
            "attribute_names": ["a", "b", "c"], "category_names": ["lower", "upper"]}
    atomic_save(model_payload(model, meta), path)
    return path


def test_cli_eval_writes_json_and_plots(model, dataset, tmp_path: Path, capsys) -> None:
    root, rows = dataset
    data = write_csv(rows, tmp_path / "dataset.csv")
    ckpt = save_checkpoint(model, tmp_path / "model.pt")
    out, plots = tmp_path / "res" / "eval.json", tmp_path / "plots"
    rc = main(["eval", str(ckpt), "--data", str(data), "--format", "csv", "--json", str(out), "--plots", str(plots),
               "--device", "cpu", "--workers", "0", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert METRIC_KEYS <= set(result)
    expected = run_evaluation(model, catalog_of(rows), size=SIZE, progress=False).metrics
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=1e-6)
    assert set(result["per_category"]) == {"lower", "upper"}
    assert (result["flip"], result["rerank"], result["num_skipped"]) == (False, False, 0)
    for name in ("cmc.png", "ranked.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "top20" in printed and "upper" in printed and "1 without" in printed


def test_cli_eval_skip_bad_counts_and_errors(model, dataset, tmp_path: Path, capsys) -> None:
    root, rows = dataset
    bad = [*rows, (str(root / "gone.jpg"), "it3", "shop", "test", "lower")]
    data = write_csv(bad, tmp_path / "dataset.csv")
    ckpt = save_checkpoint(model, tmp_path / "model.pt")
    args = ["eval", str(ckpt), "--data", str(data), "--format", "csv", "--device", "cpu", "--workers", "0",
            "--no-progress"]
    assert main(args) == 2
    assert "gone.jpg" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert main([*args, "--skip-bad", "--flip", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_skipped"] == 1 and "gone.jpg" in result["skipped"][0] and result["flip"] is True
    assert "skipped 1 records" in capsys.readouterr().err
