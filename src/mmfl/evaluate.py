"""The consumer-to-shop evaluation protocol: embed queries and gallery, rank exactly, score.

Queries are the consumer images of ``split``; the gallery is the shop images of
``gallery_splits`` (default: the query split, as the official DeepFashion README does; some
papers add ``val`` to the gallery, so it is an option and is named in the results). There is no
camera-ID filtering: queries and gallery are different domains. Ranking is exact (inner product
of L2-normalised embeddings) in blocks of query rows, so a large gallery never needs the whole
similarity matrix in memory.

``within_category`` ranks each query against the gallery images of its own category only: the
Street2Shop protocol, where every category has its own retrieval set. Off, every query searches
the whole gallery (DeepFashion's protocol) and per-category rows only group the queries.

When the model has an attribute head and the dataset labels the same attributes, the images of
``split`` (queries and that split's gallery images) also score attribute quality:
``metrics["attributes"]`` (:func:`mmfl.attribute_metrics.evaluate_attributes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from mmfl.attribute_metrics import evaluate_attributes
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError
from mmfl.extract import Features, extract_features
from mmfl.labels import AttributeDecoder
from mmfl.metrics import KS, RankResult, cmc, rank_queries, summarize

UNKNOWN_CATEGORY = "unknown"


@dataclass
class Evaluation:
    """Everything one evaluation produced: the result dict plus what plots and reports need.

    ``similarity(rows)`` gives the (len(rows), G) scores the ranking used (negated re-ranked
    distances when re-ranking was on), on the evaluation device.
    """

    metrics: dict
    queries: list[Record]
    gallery: list[Record]
    query_features: Features
    gallery_features: Features
    ranks: RankResult
    similarity: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    def top_ranked(self, query_rows: Sequence[int], top: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Gallery indices of the ``top`` best matches of each query row, and whether each is a hit.

        Order follows the metric's tie rule (descending score, then gallery index).
        """
        rows = torch.as_tensor(list(query_rows), dtype=torch.long)
        sim = self.similarity(rows).float().cpu()
        idx = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :top].numpy()
        gallery_items = np.array([g.item_id for g in self.gallery], dtype=object)
        query_items = np.array([self.queries[r].item_id for r in rows.tolist()], dtype=object)
        return idx, gallery_items[idx] == query_items[:, None]

    def sample_queries(self, n: int = 8) -> list[int]:
        """``n`` query rows with a match, evenly spread over the query list (deterministic)."""
        matched = np.flatnonzero(self.ranks.has_match)
        if matched.size == 0:
            return []
        pick = np.linspace(0, matched.size - 1, num=min(n, matched.size)).round().astype(int)
        return [int(i) for i in matched[np.unique(pick)]]

    def cmc_curves(self, max_rank: int = 50) -> dict[str, np.ndarray]:
        """CMC of all queries plus one curve per query category (when categories exist)."""
        curves = {"all": cmc(self.ranks, max_rank)}
        cats = _query_categories(self.queries)
        for name in self.metrics.get("per_category", {}):
            curves[name] = cmc(self.ranks, max_rank, mask=cats == name)
        return curves


def run_evaluation(
    model: torch.nn.Module,
    catalog: Catalog,
    split: str = "test",
    gallery_splits: Sequence[str] | None = None,
    size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = False,
    rerank: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    within_category: bool = False,
    decode_device: torch.device | None = None,
) -> Evaluation:
    """Evaluate ``model`` (already on ``device``) on ``catalog`` and keep the ranked lists.

    ``size`` is the square input size; None takes ``model.meta["config"]["input"]["size"]``
    (set by :func:`mmfl.checkpoint.load_model`). ``flip`` turns on flip test-time augmentation,
    ``rerank`` k-reciprocal re-ranking (memory grows with (queries + gallery) squared).
    ``decode_device`` decodes the JPEGs there (:func:`mmfl.extract.extract_features`).
    """
    gallery_splits = list(gallery_splits) if gallery_splits else [split]
    size = size or _model_input_size(model)
    queries = catalog.split(split, domain="consumer")
    gallery = catalog.split(gallery_splits, domain="shop")
    _check_sides(catalog, split, gallery_splits, queries, gallery)

    decoder = _attribute_decoder(model, catalog)

    def embed(records: list[Record], desc: str) -> Features:
        return extract_features(model, records, size, batch_size, device, flip, num_workers, progress,
                                predictions=decoder is not None, desc=desc, decode_device=decode_device)

    q_feat, g_feat = embed(queries, "queries"), embed(gallery, "gallery")
    similarity = _similarity(q_feat.embeddings, g_feat.embeddings, torch.device(device), rerank)
    if within_category:
        similarity = _restrict_to_category(similarity, queries, gallery, torch.device(device))
    query_items = [r.item_id for r in queries]
    gallery_items = [r.item_id for r in gallery]
    ranks = rank_queries(similarity, query_items, gallery_items)
    if not ranks.has_match.any():
        raise DataError(
            f"{catalog.name or 'dataset'}: no consumer image of split '{split}' has a shop image of its item "
            f"in gallery split(s) {','.join(gallery_splits)}"
        )
    metrics = summarize(ranks, KS)
    cats = _query_categories(queries)
    if cats is not None:
        metrics["per_category"] = {
            name: summarize(ranks, KS, mask=cats == name) for name in _category_order(catalog, cats)
        }
        if within_category:  # each category was searched in its own gallery: report that gallery's size
            gallery_cats = [r.category or UNKNOWN_CATEGORY for r in gallery]
            for name, row in metrics["per_category"].items():
                row["num_gallery"] = gallery_cats.count(name)
    metrics.update(split=split, gallery_splits=gallery_splits, flip=flip, rerank=rerank,
                   within_category=within_category, size=size)
    if decoder is not None and q_feat.attribute_probs is not None and g_feat.attribute_probs is not None:
        metrics["attributes"] = _attribute_quality(model, catalog, decoder, split, queries, gallery, q_feat, g_feat)
    return Evaluation(metrics, queries, gallery, q_feat, g_feat, ranks, similarity)


def _attribute_decoder(model: torch.nn.Module, catalog: Catalog) -> AttributeDecoder | None:
    """The checkpoint's attribute decoder when its attributes are the dataset's, else None (no scoring).

    A model trained on another vocabulary, or one without checkpoint meta (mid-training
    validation), has no attribute labels here to be measured against.
    """
    names = list((getattr(model, "meta", None) or {}).get("attribute_names") or [])
    if not names or names != catalog.attribute_names:
        return None
    return AttributeDecoder.from_meta(model.meta)


def _attribute_quality(model: torch.nn.Module, catalog: Catalog, decoder: AttributeDecoder, split: str,
                       queries: list[Record], gallery: list[Record], q_feat: Features, g_feat: Features) -> dict:
    """Attribute metrics over the query images and the gallery images of ``split`` itself."""
    in_split = [i for i, r in enumerate(gallery) if r.split == split]
    records = queries + [gallery[i] for i in in_split]
    probs = torch.cat([q_feat.attribute_probs, g_feat.attribute_probs[in_split]]).numpy()
    data = model.meta["config"]["data"]
    result = evaluate_attributes(catalog, records, probs, decoder, data["train_split"], data["val_split"])
    return {"split": split, **result}


def _model_input_size(model: torch.nn.Module) -> int:
    try:
        return int(model.meta["config"]["input"]["size"])
    except (AttributeError, KeyError, TypeError):
        raise ValueError("input size unknown: pass size= (the model carries no checkpoint meta)") from None


def _check_sides(
    catalog: Catalog, split: str, gallery_splits: list[str], queries: list[Record], gallery: list[Record]
) -> None:
    """An empty query or gallery side is a wrong split name far more often than a real dataset."""
    name = catalog.name or "dataset"
    present = sorted({r.split for r in catalog.records})
    if not queries:
        raise DataError(f"{name}: split '{split}' has no consumer (query) images (splits present: {', '.join(present)})")
    if not gallery:
        raise DataError(
            f"{name}: split(s) {','.join(gallery_splits)} have no shop (gallery) images (splits present: {', '.join(present)})"
        )


def _similarity(
    queries: torch.Tensor, gallery: torch.Tensor, device: torch.device, rerank: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row blocks of the score matrix the ranking uses (higher = better)."""
    g = gallery.to(device)
    q = queries.to(device)
    if not rerank:
        return lambda rows: q[rows.to(device)] @ g.T
    from mmfl.rerank import k_reciprocal_rerank

    def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * a @ b.T).clamp_min(0)  # squared Euclidean between unit vectors

    scores = -k_reciprocal_rerank(sq_dist(q, g), sq_dist(q, q), sq_dist(g, g))
    return lambda rows: scores[rows.to(device)]


def _restrict_to_category(
    similarity: Callable[[torch.Tensor], torch.Tensor], queries: list[Record], gallery: list[Record], device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores with every gallery image of another category pushed to -inf (ranked after all others)."""
    names = {n: i for i, n in enumerate(dict.fromkeys(r.category or UNKNOWN_CATEGORY for r in [*queries, *gallery]))}
    q_cat = torch.tensor([names[r.category or UNKNOWN_CATEGORY] for r in queries], device=device)
    g_cat = torch.tensor([names[r.category or UNKNOWN_CATEGORY] for r in gallery], device=device)

    def rows_of(rows: torch.Tensor) -> torch.Tensor:
        scores = similarity(rows).float()
        other = q_cat[rows.to(device)][:, None] != g_cat[None, :]
        return scores.masked_fill(other, -torch.inf)

    return rows_of


def _query_categories(queries: list[Record]) -> np.ndarray | None:
    """Each query's category ('unknown' where missing), or None when no query has one."""
    if not any(r.category for r in queries):
        return None
    return np.array([r.category or UNKNOWN_CATEGORY for r in queries], dtype=object)


def _category_order(catalog: Catalog, cats: np.ndarray) -> list[str]:
    """The catalog's category order for the categories present, then any others as first seen."""
    present = list(dict.fromkeys(cats.tolist()))
    known = [c for c in catalog.category_names if c in present]
    return known + [c for c in present if c not in known]
