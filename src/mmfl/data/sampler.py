"""P x K batch sampling, balanced across domains and split across DDP ranks by whole items.

Triplet losses mine inside a batch, so a batch must hold several items (P) with several images
each (K). For consumer-to-shop retrieval the positives that matter are *cross-domain*: a batch
where an item shows only its shop photos teaches nothing about matching a street photo. So each
item contributes both domains whenever it has both, split as evenly as K allows.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

from mmfl.errors import DataError


class PKSampler:
    """A batch sampler: each batch is ``items_per_batch`` (P) distinct items x ``images_per_item`` (K) indices.

    * **Domain balance**: an item with images in two domains gives ``ceil(K/2)`` from one and the
      rest from the other (which domain gets the extra image is drawn at random). If a domain is
      short, the other fills in; images repeat (drawn with replacement) only when the item has
      fewer than K images in total.
    * **Epochs**: the items are reshuffled each epoch; every batch is a deterministic function of
      ``(seed, epoch, rank)``, so a resumed run sees the batches it would have seen. Call
      :meth:`set_epoch` before iterating, as with ``DistributedSampler``.
    * **DDP**: the shuffled items are dealt out to ``world_size`` ranks, each rank gets whole
      items, no item is on two ranks in one epoch, and every rank yields the same number of
      batches (left-over items wait for another epoch's shuffle), so no rank blocks in a
      collective the others never reach.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        domains: Sequence[str],
        items_per_batch: int,
        images_per_item: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(item_ids) != len(domains):
            raise ValueError(f"PKSampler: {len(item_ids)} item ids but {len(domains)} domains")
        if items_per_batch < 1 or images_per_item < 1:
            raise ValueError(
                f"PKSampler: items_per_batch and images_per_item must be >= 1, got {items_per_batch}, {images_per_item}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PKSampler: rank {rank} is not in 0..{world_size - 1}")
        self.p = items_per_batch
        self.k = images_per_item
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # item -> domain -> dataset indices, in first-seen order (deterministic, unlike set order).
        self._pools: dict[str, dict[str, list[int]]] = {}
        for index, (item, domain) in enumerate(zip(item_ids, domains)):
            self._pools.setdefault(item, {}).setdefault(domain, []).append(index)
        self._items = list(self._pools)
        self._items_per_rank = len(self._items) // world_size
        if self._items_per_rank < self.p:
            per_rank = f" ({self._items_per_rank} per rank with world_size={world_size})" if world_size > 1 else ""
            raise DataError(
                f"P x K sampler: {len(self._items)} items{per_rank} cannot fill one batch of "
                f"{self.p} items; lower train.batch_items or use a larger training split"
            )

    def __len__(self) -> int:
        return self._items_per_rank // self.p

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[list[int]]:
        # The item order must be identical on every rank (so the deal is a partition); the image
        # draws only need to be reproducible, so each rank has its own stream for them.
        order = list(self._items)
        random.Random(f"pk-items:{self.seed}:{self.epoch}").shuffle(order)
        mine = order[: self._items_per_rank * self.world_size][self.rank :: self.world_size]
        rng = random.Random(f"pk-images:{self.seed}:{self.epoch}:{self.rank}")
        for b in range(len(self)):
            batch: list[int] = []
            for item in mine[b * self.p : (b + 1) * self.p]:
                batch.extend(_pick_images(rng, list(self._pools[item].values()), self.k))
            yield batch


def _pick_images(rng: random.Random, pools: list[list[int]], k: int) -> list[int]:
    """K indices from an item's per-domain pools, spread as evenly as possible over the domains.

    Without replacement while the item has enough images; a domain that is short hands its
    share to the others; repeats are drawn only to make up a total shortfall, each from a domain
    still below its share, so a 1-consumer/1-shop item with K=4 gives 2 + 2.
    """
    pools = pools[:]
    rng.shuffle(pools)
    n = len(pools)
    share = [k // n + (1 if i < k % n else 0) for i in range(n)]
    take = [min(s, len(pool)) for s, pool in zip(share, pools)]
    missing = k - sum(take)
    for i, pool in enumerate(pools):
        extra = min(missing, len(pool) - take[i])
        take[i] += extra
        missing -= extra
    repeats = [0] * n
    for i in range(n):
        r = min(missing, max(0, share[i] - take[i]))
        repeats[i] = r
        missing -= r
    picked: list[int] = []
    for pool, t, r in zip(pools, take, repeats):
        picked.extend(rng.sample(pool, t))
        picked.extend(rng.choices(pool, k=r))
    return picked
