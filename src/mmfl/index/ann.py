"""The approximate-nearest-neighbour settings both backends build with: index kinds and their knobs.

FAISS (:mod:`mmfl.index.faiss_store`) and Milvus (:mod:`mmfl.index.milvus_store`) build an index
of the same ``kind`` with the same parameters and record them in the manifest's ``params``, so a
gallery answers alike on either backend and a benchmark of one speaks for the other.

* ``flat``: exact inner product.
* ``ivf``: ``nlist = 4 * sqrt(N)`` inverted lists, capped so that every list has at least 39
  training vectors (as k-means needs), and ``nprobe = min(nlist, 32)`` lists scanned per query.
* ``hnsw``: ``M = 32`` links per node, ``efConstruction = 200``, ``efSearch = 128`` (raised to
  the number of rows fetched).
"""
from __future__ import annotations

import math

KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
IVF_MIN_POINTS_PER_LIST = 39


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: 4*sqrt(n), but no more than k-means can train well."""
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))
