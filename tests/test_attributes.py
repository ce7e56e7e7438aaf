"""Attributes a user can trust: exclusive groups, per-attribute thresholds, annotated vs predicted, quality.

Fixtures are a tiny generated dataset (its labels and ``list_attr_groups.txt``) and checkpoints
at 64 px: one whose attribute head is forced to the same probabilities for every image (so
what the index stores is known in advance), and one trained for two steps (so the trainer's
threshold hook and ``mmfl eval`` run for real).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfl.checkpoint import atomic_save, load_model, model_payload, read_checkpoint
from mmfl.cli import main
from mmfl.config import config_to_dict, load_config
from mmfl.data.formats import read_dataset
from mmfl.errors import DataError
from mmfl.index import Searcher, build_index, open_store, parse_filters, read_manifest
from mmfl.labels import AttributeDecoder
from mmfl.models import build_model
from mmfl.synth import generate
from mmfl.synth.attributes import EXCLUSIVE_GROUPS
from mmfl.train import train

SMALL = ["model.backbone=resnet18", "model.pretrained=none", "input.size=64", "model.neck_width=64"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attr_synth")
    generate(root, items=24, seed=2, size=64)  # seed 2: jeans in every split
    return root


@pytest.fixture(scope="module")
def forced_checkpoint(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained, but the attribute head says 0.9 for every attribute of every image, and no thresholds."""
    catalog = read_dataset(synth, "deepfashion-c2s")
    cfg = load_config("global", SMALL)
    model = build_model(cfg, 8, len(catalog.attribute_names), 0)
    with torch.no_grad():
        model.attribute_head.weight.zero_()
        model.attribute_head.bias.fill_(float(np.log(0.9 / 0.1)))
    path = tmp_path_factory.mktemp("attr_ckpt") / "forced.pt"
    atomic_save(model_payload(model, {
        "config": config_to_dict(cfg), "num_items": 8, "num_attributes": len(catalog.attribute_names),
        "num_categories": 0, "attribute_names": catalog.attribute_names, "category_names": [],
        "attribute_groups": catalog.attribute_groups,
    }), path)
    return path


@pytest.fixture(scope="module")
def trained(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attr_run")
    cfg = load_config("global", [
        f"data.root={synth}", f"output_dir={out}", *SMALL, "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_items=4", "train.images_per_item=2", "train.warmup_epochs=0", "train.eval_every=0",
        "train.tensorboard=false", "data.num_workers=0",
    ])
    return train(cfg, progress=False).last_checkpoint


def test_decoder_uses_each_threshold_and_keeps_one_value_per_group() -> None:
    names = ["sleeveless", "short_sleeve", "long_sleeve", "denim", "logo"]
    groups = {"sleeve_length": ["sleeveless", "short_sleeve", "long_sleeve"]}
    probs = np.array([0.7, 0.8, 0.6, 0.3, 0.45], np.float32)
    # The old rule (one 0.5 threshold, no groups) reported all three sleeve lengths for these.
    default = AttributeDecoder.build(names, None, groups)
    assert default.attributes(probs) == ("short_sleeve",)
    assert default.describe()["thresholds"]["source"] == "default"
    tuned = AttributeDecoder.build(names, [0.75, 0.9, 0.5, 0.25, 0.4], groups, {"split": "val"})
    # short_sleeve (0.8) and sleeveless (0.7) miss their own thresholds; long_sleeve (0.6 >= 0.5) passes
    assert tuned.attributes(probs) == ("long_sleeve", "logo", "denim")
    assert tuned.describe() == {"thresholds": {"source": "calibrated", "split": "val"},
                                "exclusive_groups": groups}
    batch = tuned.decide(np.stack([probs, np.full(5, 0.95, np.float32)]))
    # all sleeve values pass and tie: the group keeps one (the first), never three
    assert batch.tolist() == [[False, False, True, True, True], [True, False, False, True, True]]


def test_groups_file_is_read_and_generated_labels_respect_it(synth: Path, tmp_path: Path) -> None:
    catalog = read_dataset(synth, "deepfashion-c2s")
    assert catalog.attribute_groups == {g: list(names) for g, names in EXCLUSIVE_GROUPS.items()}
    column = {n: i for i, n in enumerate(catalog.attribute_names)}
    for vec in catalog.attributes.values():
        for names in EXCLUSIVE_GROUPS.values():
            assert (vec[[column[n] for n in names]] == 1).sum() <= 1
    # names with spaces (DeepFashion's "long sleeve") work; a typo or a second group is refused at its line
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    cloth = copy / "Anno" / "list_attr_cloth.txt"
    cloth.write_text(cloth.read_text().replace("long_sleeve ", "long sleeve "))
    groups = copy / "Anno" / "list_attr_groups.txt"
    groups.write_text(groups.read_text().replace("long_sleeve ", "long sleeve "))
    assert "long sleeve" in read_dataset(copy, "deepfashion-c2s").attribute_groups["sleeve_length"]
    lines = groups.read_text().splitlines()
    groups.write_text("\n".join([str(len(lines) - 1), *lines[1:], "long sleeve   neckline"]) + "\n")
    with pytest.raises(DataError, match=r"list_attr_groups.txt:\d+: attribute 'long sleeve' is already in group"):
        read_dataset(copy, "deepfashion-c2s")
    groups.write_text("\n".join(lines).replace("dotted ", "spotted ") + "\n")
    with pytest.raises(DataError, match=r"list_attr_groups.txt:\d+: attribute 'spotted' is not in list_attr_cloth.txt"):
        read_dataset(copy, "deepfashion-c2s")


def test_index_stores_annotated_attributes_and_filters_on_them(synth: Path, forced_checkpoint: Path,
                                                              tmp_path: Path, capsys) -> None:
    """Labelled items keep their labels; an unlabelled one gets predictions, one value per group; filters
    return only items whose stored attributes match; every row says where its attributes come from."""
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    catalog = read_dataset(data, "deepfashion-c2s")
    shop = catalog.split(["train", "val", "test"], "shop")
    blank = shop[0].item_id
    items = data / "Anno" / "list_attr_items.txt"
    items.write_text("\n".join(" ".join([blank] + ["0"] * len(catalog.attribute_names)) if line.startswith(blank + " ")
                               else line for line in items.read_text().splitlines()) + "\n")
    catalog = read_dataset(data, "deepfashion-c2s")
    assert catalog.annotated_attributes(blank) is None
    model = load_model(forced_checkpoint)
    out = tmp_path / "index"
    build_index(model, shop, out, progress=False, catalog=catalog)
    manifest = read_manifest(out)
    assert manifest["attribute_predictions"]["thresholds"]["source"] == "default"
    assert set(manifest["attribute_predictions"]["exclusive_groups"]) == set(EXCLUSIVE_GROUPS)
    blank_images = sum(r.item_id == blank for r in shop)
    assert manifest["facets"]["attribute_sources"] == {"annotated": len(shop) - blank_images, "predicted": blank_images}
    store = open_store(out)
    try:
        entries = store.entries
    finally:
        store.close()
    for e in entries:
        if e.item_id == blank:
            # every probability is 0.9: the old rule stored all 35 names, three sleeve lengths among them
            assert e.attribute_source == "predicted"
            assert sum(a in EXCLUSIVE_GROUPS["sleeve_length"] for a in e.attributes) == 1
            assert all(sum(a in names for a in e.attributes) == 1 for names in EXCLUSIVE_GROUPS.values())
        else:
            assert e.attribute_source == "annotated" and e.attributes == catalog.annotated_attributes(e.item_id)
    denim = {e.item_id for e in entries if "denim" in e.attributes}
    assert denim, "the generated gallery has jeans"
    capsys.readouterr()
    query = catalog.split("test", "consumer")[0].path
    assert main(["search", str(out), query, "--filter", "attribute=denim", "--top-k", "50", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert {r["item_id"] for r in results} == denim
    assert all("denim" in r["attributes"] and r["attribute_source"] == "annotated" for r in results)
    assert main(["search", str(out), query, "--top-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[5] == "from" and all(" annotated " in row or " predicted " in row for row in table[2:])
    # Milvus Lite stores and filters the same
    milvus = tmp_path / "milvus"
    build_index(model, shop, milvus, backend="milvus", progress=False, catalog=catalog)
    searcher = Searcher(milvus)
    try:
        answer = searcher.search_photo(query, k=50, flt=parse_filters(["attribute=denim"]))
        everything = searcher.search_photo(query, k=50)
    finally:
        searcher.close()
    assert {r["item_id"] for r in answer["results"]} == denim
    sources = {r["item_id"]: r["attribute_source"] for r in everything["results"]}
    assert sources[blank] == "predicted" and set(sources.values()) == {"annotated", "predicted"}


def test_training_stores_val_thresholds_and_eval_measures_attributes(trained: Path, synth: Path,
                                                                     tmp_path: Path, capsys) -> None:
    ckpt = read_checkpoint(trained)
    catalog = read_dataset(synth, "deepfashion-c2s")
    assert len(ckpt["attribute_thresholds"]) == len(catalog.attribute_names)
    calibration = ckpt["attribute_calibration"]
    assert calibration["split"] == "val" and calibration["images"] == len(catalog.split("val"))
    assert ckpt["attribute_groups"] == catalog.attribute_groups
    assert ckpt["train_state"]["epoch"] == 1, "the training state is kept as saved"
    model = load_model(trained)
    assert AttributeDecoder.from_meta(model.meta).describe()["thresholds"]["source"] == "calibrated"

    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained), "--data", str(synth), "--json", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "attributes: " in printed and "prior (train rates)" in printed
    attrs = json.loads(out.read_text())["attributes"]
    test_images = len(catalog.split("test"))
    assert (attrs["split"], attrs["num_images"], attrs["num_attributes"]) == ("test", test_images,
                                                                              len(catalog.attribute_names))
    assert 0 < attrs["num_scored"] <= attrs["num_attributes"]
    assert set(attrs["mAP"]) == {"model", "prior"} and set(attrs["mean_f1"]) == {"model", "model_at_0.5", "prior"}
    assert all(0 <= v <= 1 for v in (*attrs["mAP"].values(), *attrs["mean_f1"].values()))
    assert attrs["thresholds"]["source"] == "calibrated"
    assert attrs["images_with_conflicting_values"]["model"] == 0 and "images with two values" in printed
    row = next(iter(attrs["per_attribute"].values()))
    assert {"positives", "negatives", "threshold", "prior", "ap", "f1"} <= set(row)
