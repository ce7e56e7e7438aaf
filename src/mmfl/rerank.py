"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), written from the paper's description.

Why it helps retrieval: two images that are each in the other's k nearest neighbours
(*k-reciprocal* neighbours) are far more likely to show the same item than a one-way neighbour.
Each image is encoded as a weighted set of its (expanded) k-reciprocal neighbours; the Jaccard
distance between those sets, mixed with the original distance, re-orders the gallery.

Cost: it works on the joint (Q+G) x (Q+G) distance matrix and holds several such float32
matrices at once (6.4 GB each at 40k images), so it is meant for benchmark-sized galleries,
off by default and named in the results when on.
"""
from __future__ import annotations

import numpy as np
import torch


def k_reciprocal_rerank(
    q_g: torch.Tensor | np.ndarray,
    q_q: torch.Tensor | np.ndarray,
    g_g: torch.Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> torch.Tensor:
    """Re-ranked (Q, G) query-to-gallery distances (smaller = closer) from original distances.

    ``q_g``, ``q_q`` and ``g_g`` are query-gallery, query-query and gallery-gallery distances
    (any non-negative distance, e.g. squared Euclidean between L2-normalised embeddings).
    ``k1`` sizes the k-reciprocal sets, ``k2`` the local query expansion and ``lambda_value``
    weighs the original distance in the final mix. Runs on the device of ``q_g``.
    """
    q_g, q_q, g_g = (torch.as_tensor(m).float() for m in (q_g, q_q, g_g))
    num_q, num_g = q_g.shape
    device = q_g.device
    dist = torch.cat([torch.cat([q_q.to(device), q_g], 1), torch.cat([q_g.T, g_g.to(device)], 1)], 0)
    dist = dist / dist.max().clamp_min(1e-12)  # scale to [0, 1] so exp(-d) and the mix are comparable
    n = dist.shape[0]
    k1 = max(1, min(k1, n - 1))
    k2 = max(1, min(k2, n))
    neighbours = torch.topk(dist, k1 + 1, dim=1, largest=False).indices  # includes the image itself

    reciprocal = _reciprocal(neighbours, n)
    half = _reciprocal(neighbours[:, : round(k1 / 2) + 1], n)
    expanded = _expand(reciprocal, half)

    weights = torch.where(expanded, torch.exp(-dist), torch.zeros((), device=device))
    weights = weights / weights.sum(1, keepdim=True)
    if k2 > 1:  # local query expansion: average the encodings of the k2 nearest neighbours
        weights = sum(weights[neighbours[:, t]] for t in range(k2)) / k2

    jaccard = _jaccard(weights[:num_q], weights[num_q:])
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_q, num_q:]


def _reciprocal(neighbours: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) bool: j is among i's neighbours and i among j's."""
    forward = torch.zeros((n, n), dtype=torch.bool, device=neighbours.device)
    forward.scatter_(1, neighbours, True)
    return forward & forward.T


def _expand(reciprocal: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Add a candidate's half-size reciprocal set when more than 2/3 of it is already in the set.

    This recovers positives that missed the k-reciprocal set because of pose or viewpoint while
    refusing candidates whose own neighbourhood is mostly elsewhere. Reciprocal sets are sparse
    (about k1 per row), so the set algebra runs as sparse x dense products, O(k1 n^2) not O(n^3).
    """
    hf = half.float()  # symmetric by construction, so hf.T == hf
    overlap = torch.sparse.mm(reciprocal.float().to_sparse(), hf)  # overlap[i, c] = |R(i, k1) & R(c, k1/2)|
    accept = reciprocal & (overlap > (2.0 / 3.0) * hf.sum(1)[None, :])
    return reciprocal | (torch.sparse.mm(accept.float().to_sparse(), hf) > 0)


def _jaccard(query_weights: torch.Tensor, gallery_weights: torch.Tensor, max_elements: int = 1 << 25) -> torch.Tensor:
    """Weighted Jaccard distance 1 - sum(min) / sum(max) between query and gallery encodings.

    Encodings are rows summing to 1, so sum(max) = 2 - sum(min). A query's encoding is sparse
    (its expanded neighbours), so only its P largest columns are compared, for blocks of queries
    at once; padding columns carry weight 0 and add nothing to sum(min).
    """
    num_q, num_g = query_weights.shape[0], gallery_weights.shape[0]
    out = torch.empty(num_q, num_g, device=query_weights.device)
    width = max(1, int((query_weights > 0).sum(1).max())) if num_q else 1
    values, cols = torch.topk(query_weights, width, dim=1)
    by_column = gallery_weights.T.contiguous()  # row k: every gallery image's weight on column k
    block = max(1, max_elements // (width * max(num_g, 1)))
    for start in range(0, num_q, block):
        stop = start + block
        shared = torch.minimum(by_column[cols[start:stop]], values[start:stop, :, None]).sum(1)
        out[start:stop] = 1 - shared / (2 - shared)
    return out
