"""P x K sampler invariants: shape, domain balance, determinism, DDP partition, errors."""
from __future__ import annotations

from collections import Counter

import pytest

from mmfl.data.sampler import PKSampler
from mmfl.errors import DataError


def make_dataset() -> tuple[list[str], list[str]]:
    """12 items: most with both domains in varied amounts, some shop-only, one with a single image."""
    item_ids: list[str] = []
    domains: list[str] = []
    layout = {f"item{i:02d}": (i % 3 + 1, 3) for i in range(9)}  # 1..3 consumer, 3 shop
    layout.update({"shoponly_a": (0, 5), "shoponly_b": (0, 2), "single": (1, 0)})
    for item, (n_consumer, n_shop) in layout.items():
        for _ in range(n_consumer):
            item_ids.append(item)
            domains.append("consumer")
        for _ in range(n_shop):
            item_ids.append(item)
            domains.append("shop")
    return item_ids, domains


ITEMS, DOMAINS = make_dataset()


def batches(sampler: PKSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_are_p_items_by_k_images_with_both_domains() -> None:
    p, k = 4, 4
    sampler = PKSampler(ITEMS, DOMAINS, p, k, seed=3)
    assert len(sampler) == 12 // p
    for epoch in range(5):
        out = batches(sampler, epoch)
        assert len(out) == len(sampler)
        for batch in out:
            assert len(batch) == p * k
            per_item = Counter(ITEMS[i] for i in batch)
            assert len(per_item) == p and set(per_item.values()) == {k}
            # an item's K images are contiguous in the batch
            assert [ITEMS[i] for i in batch] == [ITEMS[batch[j * k]] for j in range(p) for _ in range(k)]
            for item in per_item:
                idx = [i for i in batch if ITEMS[i] == item]
                available = {d for it, d in zip(ITEMS, DOMAINS) if it == item}
                doms = Counter(DOMAINS[i] for i in idx)
                assert set(doms) == available  # both domains whenever the item has both
                n_images = ITEMS.count(item)
                if n_images >= k:
                    assert len(set(idx)) == k  # no repeats while the item has enough images
                else:
                    assert len(set(idx)) == n_images  # every image, then repeats
                n_consumer = sum(1 for it, d in zip(ITEMS, DOMAINS) if it == item and d == "consumer")
                if len(available) == 2:
                    # K=4 -> 2 + 2; an item with a single consumer image gives 1 + 3
                    assert doms["consumer"] == min(n_consumer, k // 2)


def test_odd_k_splits_ceil_and_floor() -> None:
    item_ids = [f"i{j}" for j in range(4) for _ in range(8)]
    domains = ["consumer", "shop"] * 16
    sampler = PKSampler(item_ids, domains, items_per_batch=2, images_per_item=3, seed=0)
    seen_majority = Counter()
    for epoch in range(10):
        for batch in batches(sampler, epoch):
            for j in range(2):
                doms = Counter(domains[i] for i in batch[j * 3 : (j + 1) * 3])
                assert sorted(doms.values()) == [1, 2]
                seen_majority[doms.most_common(1)[0][0]] += 1
    assert set(seen_majority) == {"consumer", "shop"}  # the extra image goes to either domain


def test_short_domain_is_filled_by_the_other_before_repeating() -> None:
    # 1 consumer + 5 shop images, K=4: 1 consumer + 3 distinct shop, no repeats
    item_ids = ["a"] * 6 + ["b"] * 6
    domains = ["consumer"] + ["shop"] * 5 + ["consumer"] + ["shop"] * 5
    sampler = PKSampler(item_ids, domains, items_per_batch=2, images_per_item=4)
    for batch in batches(sampler, 0):
        assert len(set(batch)) == 8
        assert Counter(domains[i] for i in batch) == {"consumer": 2, "shop": 6}
    # 1 consumer + 1 shop, K=4: repeats keep the 2 + 2 balance
    tiny = PKSampler(["a", "a", "b", "b"], ["consumer", "shop"] * 2, items_per_batch=2, images_per_item=4)
    for batch in batches(tiny, 0):
        assert Counter(["consumer", "shop"][i % 2] for i in batch) == {"consumer": 4, "shop": 4}


def test_one_epoch_visits_every_item_once() -> None:
    sampler = PKSampler(ITEMS, DOMAINS, 3, 2, seed=1)
    seen = [ITEMS[b[j * 2]] for b in batches(sampler, 0) for j in range(3)]
    assert sorted(seen) == sorted(set(ITEMS))


def test_deterministic_per_seed_and_epoch() -> None:
    a = PKSampler(ITEMS, DOMAINS, 4, 4, seed=7)
    b = PKSampler(ITEMS, DOMAINS, 4, 4, seed=7)
    assert batches(a, 2) == batches(b, 2)
    assert batches(a, 2) != batches(a, 3)
    assert batches(a, 2) != batches(PKSampler(ITEMS, DOMAINS, 4, 4, seed=8), 2)
    # iterating twice in the same epoch gives the same batches (nothing hidden in the state)
    assert list(a) == list(a)


def test_state_dict_round_trip_resumes_the_same_batches() -> None:
    a = PKSampler(ITEMS, DOMAINS, 4, 4, seed=5)
    a.set_epoch(4)
    state = a.state_dict()
    assert state == {"seed": 5, "epoch": 4}
    b = PKSampler(ITEMS, DOMAINS, 4, 4, seed=0)
    b.load_state_dict(state)
    assert list(b) == list(a)


def test_ddp_ranks_get_disjoint_whole_items_and_equal_length() -> None:
    p, k = 2, 3
    ranks = [PKSampler(ITEMS, DOMAINS, p, k, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (12 // 2) // p
    for epoch in range(4):
        items_per_rank = []
        for sampler in ranks:
            out = batches(sampler, epoch)
            assert len(out) == len(sampler)
            assert all(len(b) == p * k for b in out)
            items_per_rank.append({ITEMS[i] for b in out for i in b})
        assert not items_per_rank[0] & items_per_rank[1]
        assert len(items_per_rank[0]) == len(items_per_rank[1]) == 6
    # uneven: 12 items over 5 ranks -> 2 items each, 2 left for later epochs; same length everywhere
    five = [PKSampler(ITEMS, DOMAINS, 2, 2, rank=r, world_size=5) for r in range(5)]
    assert {len(s) for s in five} == {1}
    used = [ITEMS[i] for s in five for b in batches(s, 0) for i in b[::2]]
    assert len(used) == len(set(used)) == 10


def test_too_few_items_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="12 items cannot fill one batch of 13 items"):
        PKSampler(ITEMS, DOMAINS, 13, 2)
    with pytest.raises(DataError, match=r"4 per rank with world_size=3.*batch of 5 items.*train.batch_items"):
        PKSampler(ITEMS, DOMAINS, 5, 2, world_size=3)
    with pytest.raises(DataError, match="0 items"):
        PKSampler([], [], 2, 2)
