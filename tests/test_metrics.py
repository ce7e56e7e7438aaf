"""Retrieval metrics against rankings worked out by hand, a naive reference, and re-ranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfl.metrics import cmc, rank_queries, retrieval_metrics, summarize
from mmfl.rerank import k_reciprocal_rerank

# Gallery: six images of four items; item A and B have two images each.
GALLERY = ["A", "B", "A", "C", "B", "D"]
QUERIES = ["A", "B", "C", "E", "D"]
SIM = np.array([
    # q0 (A): order g1 g2 g3 g4 g0 g5 -> A at ranks 2 and 5: first hit 2, AP = (1/2 + 2/5) / 2 = 0.45
    [0.1, 0.9, 0.8, 0.3, 0.2, 0.0],
    # q1 (B): tie 0.7 between g1 and g4 (both B), tie 0.5 for g0 g2 g3 -> B at ranks 1, 2: AP = 1
    [0.5, 0.7, 0.5, 0.5, 0.7, 0.1],
    # q2 (C): four-way tie, broken by gallery index: g0 g1 g2 g3 -> C at rank 4: AP = 1/4
    [0.4, 0.4, 0.4, 0.4, 0.0, 0.0],
    # q3 (E): no gallery image of E -> not scored, counted as without match
    [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
    # q4 (D): everything tied -> D (g5, the last index) at rank 6: AP = 1/6
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
], dtype=np.float32)
# Scored queries q0 q1 q2 q4 with first hits at ranks 2, 1, 4, 6:
EXPECTED = {
    "top1": 1 / 4,  # q1
    "top3": 2 / 4,  # q0, q1
    "top5": 3 / 4,  # q0, q1, q2
    "top6": 4 / 4,
    "mAP": (0.45 + 1.0 + 0.25 + 1 / 6) / 4,  # = 0.466667
    "num_queries": 4,
    "num_gallery": 6,
    "num_queries_without_match": 1,
}


def test_hand_worked_ranking() -> None:
    got = retrieval_metrics(SIM, QUERIES, GALLERY, ks=(1, 3, 5, 6))
    assert got == pytest.approx(EXPECTED)
    assert got["mAP"] == pytest.approx(0.4666667, abs=1e-6)


def test_hand_worked_per_query_and_default_keys() -> None:
    result = rank_queries(torch.from_numpy(SIM), QUERIES, GALLERY)
    assert result.first_hit.tolist() == [1, 0, 3, -1, 5]  # 0-based; -1 = no gallery image of the item
    ap = result.average_precision
    assert ap[[0, 1, 2, 4]] == pytest.approx([0.45, 1.0, 0.25, 1 / 6])
    assert np.isnan(ap[3])
    default = summarize(result)
    assert set(default) == {"top1", "top5", "top10", "top20", "top50", "mAP", "num_queries", "num_gallery",
                            "num_queries_without_match"}
    assert default["top10"] == default["top50"] == 1.0  # the gallery has 6 images: every match is in the top 10


def test_mask_selects_a_subset_and_cmc_steps() -> None:
    result = rank_queries(SIM, QUERIES, GALLERY)
    sub = summarize(result, ks=(1, 3), mask=np.array([True, False, True, True, False]))  # q0, q2 and q3 (no match)
    assert sub == pytest.approx({"top1": 0.0, "top3": 0.5, "mAP": (0.45 + 0.25) / 2, "num_queries": 2,
                                 "num_gallery": 6, "num_queries_without_match": 1})
    assert cmc(result, max_rank=6).tolist() == pytest.approx([1 / 4, 2 / 4, 2 / 4, 3 / 4, 3 / 4, 1.0])
    none = summarize(result, mask=np.array([False, False, False, True, False]))
    assert none["top1"] is None and none["mAP"] is None and none["num_queries_without_match"] == 1


def test_nan_scores_rank_last() -> None:
    sim = np.array([[np.nan, 0.2, 0.1]], dtype=np.float32)
    result = rank_queries(sim, ["A"], ["A", "B", "C"])
    assert result.first_hit.tolist() == [2]


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(5, 6\)"):
        retrieval_metrics(SIM[:, :5], QUERIES, GALLERY)


def naive_metrics(sim: np.ndarray, queries: list[str], gallery: list[str], ks: tuple[int, ...]) -> dict:
    """One query at a time with a full stable sort: the definition, written plainly."""
    gallery_arr = np.array(gallery)
    hits = {k: [] for k in ks}
    aps, without = [], 0
    for q, item in enumerate(queries):
        order = np.argsort(-sim[q], kind="stable")
        positions = np.flatnonzero(gallery_arr[order] == item)
        if positions.size == 0:
            without += 1
            continue
        for k in ks:
            hits[k].append(positions[0] < k)
        aps.append(np.mean(np.arange(1, positions.size + 1) / (positions + 1)))
    out = {f"top{k}": float(np.mean(v)) for k, v in hits.items()}
    out.update(mAP=float(np.mean(aps)), num_queries=len(aps), num_gallery=len(gallery),
               num_queries_without_match=without)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("integer_scores", [True, False])
def test_matches_naive_reference_and_chunking(seed: int, integer_scores: bool) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, 60, 70).astype(str).tolist()
    gallery = rng.integers(0, 50, 300).astype(str).tolist()  # several images per item; some queries unmatched
    sim = rng.integers(0, 8, (70, 300)) if integer_scores else rng.standard_normal((70, 300))  # ties vs none
    sim = sim.astype(np.float32)
    ks = (1, 5, 10, 20, 50)
    expected = naive_metrics(sim, queries, gallery, ks)
    assert 0 < expected["num_queries_without_match"] < 70
    whole = retrieval_metrics(sim, queries, gallery, ks)
    assert whole == pytest.approx(expected, rel=1e-9)
    one_row_blocks = retrieval_metrics(torch.from_numpy(sim), queries, gallery, ks, max_elements=1)
    assert one_row_blocks == whole
    by_rows = summarize(rank_queries(lambda rows: torch.from_numpy(sim)[rows], queries, gallery, max_elements=900), ks)
    assert by_rows == whole


def clustered(seed: int, noise: float = 0.15) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """40 items, 2 queries and 4 gallery images each, around unit-norm item centres in 16-D."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(40, 16, generator=gen), dim=1)

    def draw(per_item: int) -> tuple[torch.Tensor, list[str]]:
        ids = torch.arange(40).repeat_interleave(per_item)
        x = F.normalize(centres[ids] + noise * torch.randn(len(ids), 16, generator=gen), dim=1)
        return x, [f"item{i}" for i in ids.tolist()]

    return (*draw(2), *draw(4))


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * a @ b.T).clamp_min(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_rerank_shape_and_clean_case(seed: int) -> None:
    q, q_items, g, g_items = clustered(seed)
    before = retrieval_metrics(q @ g.T, q_items, g_items)
    dist = k_reciprocal_rerank(sq_dist(q, g), sq_dist(q, q), sq_dist(g, g))
    assert dist.shape == (80, 160)
    assert torch.isfinite(dist).all() and (dist >= 0).all()
    after = retrieval_metrics(-dist, q_items, g_items)
    assert before["mAP"] > 0.9  # a clean case: the plain ranking is already good
    assert after["mAP"] >= before["mAP"]  # measured: 0.956 -> 0.979 (seed 0), 0.953 -> 0.993 (seed 1)
    assert after["top1"] >= before["top1"]


def test_rerank_accepts_numpy_and_small_sets() -> None:
    q, q_items, g, g_items = clustered(0)
    q, g = q[:3], g[:4]  # fewer images than k1: the neighbourhood sizes are clamped
    dist = k_reciprocal_rerank(sq_dist(q, g).numpy(), sq_dist(q, q).numpy(), sq_dist(g, g).numpy())
    assert dist.shape == (3, 4) and torch.isfinite(dist).all()


def test_rerank_set_algebra_matches_dense_definitions() -> None:
    """The sparse expansion and blocked Jaccard equal their plain dense formulas."""
    from mmfl.rerank import _expand, _jaccard, _reciprocal

    x = F.normalize(torch.randn(120, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    dist = sq_dist(x, x)
    neighbours = torch.topk(dist, 11, dim=1, largest=False).indices
    rec, half = _reciprocal(neighbours, 120), _reciprocal(neighbours[:, :6], 120)
    overlap = rec.float() @ half.float().T
    accept = rec & (overlap > (2 / 3) * half.float().sum(1)[None, :])
    dense = rec | ((accept.float() @ half.float()) > 0)
    expanded = _expand(rec, half)
    assert torch.equal(expanded, dense) and expanded.sum() > rec.sum()

    weights = torch.where(expanded, torch.exp(-dist), torch.zeros(()))
    weights = weights / weights.sum(1, keepdim=True)
    q, g = weights[:30], weights[30:]
    shared = torch.minimum(q[:, None, :], g[None, :, :]).sum(2)
    union = torch.maximum(q[:, None, :], g[None, :, :]).sum(2)
    assert torch.allclose(_jaccard(q, g, max_elements=1), 1 - shared / union, atol=1e-6)
    assert torch.allclose(_jaccard(q, g), 1 - shared / union, atol=1e-6)


# ----------------------------------------------------------------------------- attribute metrics
# One attribute over six images: image 3's label is unknown (0) and must count for nothing.
ATTR_SCORES = np.array([0.9, 0.8, 0.8, 0.4, 0.3, 0.2], np.float32)
ATTR_LABELS = np.array([1, -1, 1, 0, 1, -1], np.int8)


def test_attribute_ap_f1_and_threshold_by_hand() -> None:
    """Known labels ranked: 0.9+, (0.8-, 0.8+ tied), 0.3+, 0.2- (three positives).

    Cuts: 0.9 -> P 1, R 1/3; 0.8 -> P 2/3, R 2/3; 0.3 -> P 3/4, R 1; so AP = 1/3 + 2/9 + 1/4 = 29/36.
    F1 at the cuts: 1/2, 2/3, 6/7, 3/4: the best keeps 0.3, the threshold sits half-way to 0.2.
    """
    from mmfl.attribute_metrics import average_precision, choose_thresholds, f1_score, positive_rates

    assert average_precision(ATTR_SCORES, ATTR_LABELS) == pytest.approx(29 / 36)
    # a constant score (the prior) ranks everything as one tie: AP = share of positives, 3 of 5 known
    assert average_precision(np.full(6, 0.1), ATTR_LABELS) == pytest.approx(3 / 5)
    assert average_precision(ATTR_SCORES, np.array([1, 1, 0, 0, 1, 1])) is None  # no known negative
    assert f1_score(np.array([1, 0, 1, 1, 0, 0], bool), ATTR_LABELS) == pytest.approx(4 / 5)
    labels = np.stack([ATTR_LABELS, np.array([0, -1, 0, -1, 0, 0])], axis=1)  # 2nd: no known positive
    thresholds = choose_thresholds(np.stack([ATTR_SCORES, ATTR_SCORES], axis=1), labels)
    assert thresholds.tolist() == pytest.approx([0.25, 0.5])
    assert positive_rates(labels).tolist() == pytest.approx([3 / 5, 0.0])


def test_attribute_quality_scores_only_attributes_with_both_labels() -> None:
    from mmfl.attribute_metrics import attribute_quality

    labels = np.stack([ATTR_LABELS, np.array([1, 1, 1, 0, 1, 1])], axis=1)
    scores = np.stack([ATTR_SCORES, ATTR_SCORES], axis=1)
    result = attribute_quality(["a", "b"], labels, {"model": scores, "prior": np.full((6, 2), 0.5)},
                               {"model": scores >= 0.25})
    assert (result["num_images"], result["num_attributes"], result["num_scored"]) == (6, 2, 1)
    assert result["mAP"] == pytest.approx({"model": 29 / 36, "prior": 3 / 5})
    assert result["mean_f1"] == pytest.approx({"model": 6 / 7})
    assert result["per_attribute"]["a"]["positives"] == 3 and result["per_attribute"]["a"]["negatives"] == 2
