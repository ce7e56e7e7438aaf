"""Retrieval metrics for the consumer-to-shop protocol: top-k hit rate, mAP and the CMC curve.

Definitions (DESIGN.md section 4):

* **top-k** is a *hit rate*: a query counts at k when any gallery image of its item is among
  the first k of the ranking. It is not mmfashion's recall (true positives / relevant images).
* **mAP** is the mean over queries of average precision over the *full* ranking: the mean, over
  the query's relevant gallery images, of the precision at each one's rank.
* Queries whose item has no gallery image cannot be scored: they are left out of every
  average and counted in ``num_queries_without_match``; ``num_queries`` counts the rest.
* **Ties** are broken by gallery index: the ranking is a stable sort by descending score, so of
  two equal scores the lower gallery index ranks first. NaN scores rank last.

Nothing here sorts the gallery. The rank of a relevant gallery image is the number of images
that beat it (higher score, or equal score and lower index), counted with one vectorised
comparison over the query's row. A query has only a few relevant images, so this costs a few
passes over the row instead of an ``O(G log G)`` sort, and memory stays bounded by processing
blocks of queries of at most ``max_elements`` similarity entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

KS: tuple[int, ...] = (1, 5, 10, 20, 50)
#: Similarity entries processed at once (one block of query rows); ~16M floats is ~64 MB.
MAX_ELEMENTS = 1 << 24

SimilarityRows = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RankResult:
    """Per-query outcome of a ranking, in query order.

    ``first_hit`` is the 0-based rank of the first relevant gallery image (-1 when the query's
    item has no gallery image); ``average_precision`` is NaN for those queries.
    """

    first_hit: np.ndarray
    average_precision: np.ndarray
    num_gallery: int

    @property
    def has_match(self) -> np.ndarray:
        return self.first_hit >= 0


class Relevance:
    """Which gallery columns belong to each query's item, computed once for many query blocks.

    The gallery is grouped by item (stable, so each item's columns stay in ascending order);
    a query's relevant columns are then one contiguous run of ``gallery_by_item``.
    """

    def __init__(self, query_item_ids: Sequence[str], gallery_item_ids: Sequence[str]):
        q_ids = np.asarray(list(query_item_ids), dtype=object).astype(str)
        g_ids = np.asarray(list(gallery_item_ids), dtype=object).astype(str)
        _, codes = np.unique(np.concatenate([q_ids, g_ids]), return_inverse=True)
        codes = codes.reshape(-1)
        q_codes, g_codes = codes[: len(q_ids)], codes[len(q_ids):]
        num_codes = int(codes.max()) + 1 if codes.size else 0
        per_item = np.bincount(g_codes, minlength=num_codes)
        starts = np.concatenate([[0], np.cumsum(per_item)[:-1]]) if num_codes else np.zeros(0, np.int64)
        self.num_queries = len(q_ids)
        self.num_gallery = len(g_ids)
        self.gallery_by_item = torch.from_numpy(np.argsort(g_codes, kind="stable").astype(np.int64))
        self.start = torch.from_numpy(starts[q_codes].astype(np.int64)) if num_codes else torch.zeros(0, dtype=torch.int64)
        self.count = torch.from_numpy(per_item[q_codes].astype(np.int64)) if num_codes else torch.zeros(0, dtype=torch.int64)

    def columns(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(rows), R) relevant gallery columns of ``rows`` and the mask of real (unpadded) entries."""
        count = self.count[rows]
        width = int(count.max()) if len(rows) else 0
        offsets = torch.arange(width)
        valid = offsets[None, :] < count[:, None]
        slots = (self.start[rows][:, None] + offsets[None, :]).clamp(max=max(self.num_gallery - 1, 0))
        cols = self.gallery_by_item[slots] if self.num_gallery else slots
        return torch.where(valid, cols, torch.zeros_like(cols)), valid


def rank_queries(
    sim: torch.Tensor | np.ndarray | SimilarityRows,
    query_item_ids: Sequence[str],
    gallery_item_ids: Sequence[str],
    max_elements: int = MAX_ELEMENTS,
) -> RankResult:
    """Rank the gallery for every query and record the first hit and average precision.

    ``sim`` is a (Q, G) similarity matrix (higher = closer), or a function mapping a LongTensor of
    query rows to their (len(rows), G) similarity rows, so that callers with a huge gallery never
    hold the whole matrix. Queries are processed in blocks of at most ``max_elements`` entries,
    ordered by how many relevant images they have so that padding the per-block table is cheap.
    """
    rel = Relevance(query_item_ids, gallery_item_ids)
    rows_of = _row_source(sim, rel)
    num_q, num_g = rel.num_queries, rel.num_gallery
    first_hit = np.full(num_q, -1, dtype=np.int64)
    ap = np.full(num_q, np.nan, dtype=np.float64)
    order = torch.argsort(rel.count, stable=True)
    order = order[rel.count[order] > 0]  # queries without a match need no ranking
    block = max(1, max_elements // max(num_g, 1))
    for begin in range(0, len(order), block):
        rows = order[begin:begin + block]
        ranks, valid = _relevant_ranks(rows_of(rows), *rel.columns(rows))
        hits, precision = _first_hit_and_ap(ranks, valid)
        first_hit[rows.numpy()] = hits
        ap[rows.numpy()] = precision
    return RankResult(first_hit=first_hit, average_precision=ap, num_gallery=num_g)


def _row_source(sim: torch.Tensor | np.ndarray | SimilarityRows, rel: Relevance) -> SimilarityRows:
    if callable(sim):
        return sim
    matrix = torch.as_tensor(sim)
    if matrix.dim() != 2 or tuple(matrix.shape) != (rel.num_queries, rel.num_gallery):
        raise ValueError(
            f"similarity matrix has shape {tuple(matrix.shape)}, expected ({rel.num_queries}, {rel.num_gallery})"
        )
    return lambda rows: matrix[rows.to(matrix.device)]


def _relevant_ranks(sim: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each relevant column under the stable descending order, sorted per row.

    rank(j) = #{g : s_g > s_j} + #{g : s_g = s_j and g < j}: exactly j's position in a stable
    descending sort, found with one comparison pass per relevant slot.
    """
    sim = sim.float()
    if torch.isnan(sim).any():
        sim = torch.where(torch.isnan(sim), torch.full_like(sim, -torch.inf), sim)
    cols = cols.to(sim.device)
    scores = torch.gather(sim, 1, cols)
    index = torch.arange(sim.shape[1], device=sim.device)
    ranks = torch.empty_like(cols)
    for slot in range(cols.shape[1]):
        s = scores[:, slot:slot + 1]
        before = (sim > s) | ((sim == s) & (index[None, :] < cols[:, slot:slot + 1]))
        ranks[:, slot] = torch.count_nonzero(before, dim=1)
    valid = valid.to(sim.device)
    ranks = torch.where(valid, ranks, torch.full_like(ranks, torch.iinfo(torch.int64).max))
    return torch.sort(ranks, dim=1).values.cpu(), valid.cpu()


def _first_hit_and_ap(ranks: torch.Tensor, valid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """First hit = smallest rank; AP = mean over the i-th relevant image of i / (rank_i + 1)."""
    hits_so_far = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
    precision = torch.where(valid, hits_so_far / (ranks.double() + 1.0), torch.zeros((), dtype=torch.float64))
    ap = precision.sum(1) / valid.sum(1).double()
    return ranks[:, 0].numpy(), ap.numpy()


def summarize(result: RankResult, ks: Sequence[int] = KS, mask: np.ndarray | None = None) -> dict:
    """The metric dict over all queries (or those selected by ``mask``).

    Averages are over queries with a match; they are None when no selected query has one.
    """
    selected = np.ones(len(result.first_hit), bool) if mask is None else np.asarray(mask, bool)
    matched = selected & result.has_match
    n = int(matched.sum())
    out: dict = {}
    for k in ks:
        out[f"top{k}"] = float(np.mean(result.first_hit[matched] < k)) if n else None
    out["mAP"] = float(np.mean(result.average_precision[matched])) if n else None
    out["num_queries"] = n
    out["num_gallery"] = result.num_gallery
    out["num_queries_without_match"] = int((selected & ~result.has_match).sum())
    return out


def retrieval_metrics(
    sim: torch.Tensor | np.ndarray,
    query_item_ids: Sequence[str],
    gallery_item_ids: Sequence[str],
    ks: Sequence[int] = KS,
    max_elements: int = MAX_ELEMENTS,
) -> dict:
    """top-k hit rates and mAP (fractions in [0, 1]) plus query/gallery counts for a (Q, G) similarity.

    Keys: ``top{k}`` for each k, ``mAP``, ``num_queries`` (queries with a match),
    ``num_gallery``, ``num_queries_without_match``.
    """
    return summarize(rank_queries(sim, query_item_ids, gallery_item_ids, max_elements), ks)


def cmc(result: RankResult, max_rank: int = 50, mask: np.ndarray | None = None) -> np.ndarray:
    """Cumulative match characteristic: entry k-1 is the top-k hit rate, k = 1..max_rank."""
    selected = np.ones(len(result.first_hit), bool) if mask is None else np.asarray(mask, bool)
    hits = result.first_hit[selected & result.has_match]
    if hits.size == 0:
        return np.zeros(max_rank)
    counts = np.bincount(np.minimum(hits, max_rank), minlength=max_rank + 1)[:max_rank]
    return np.cumsum(counts) / hits.size
