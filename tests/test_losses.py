"""Losses against hand-computed values, plus the properties the improved trihard claims."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mmfl.config import Config
from mmfl.losses import (
    CenterLoss,
    MultiTaskLoss,
    attribute_bce,
    batch_hard_triplet,
    build_criterion,
    category_cross_entropy,
    id_cross_entropy,
    improved_trihard,
    rescale_center_grads,
    terms_to_floats,
)

try:
    from mmfl.models import TrainOutput
except ImportError:  # the model package is written concurrently; same field names as interfaces.md

    @dataclass
    class TrainOutput:  # type: ignore[no-redef]
        features: list[torch.Tensor]
        logits: list[torch.Tensor]
        global_feature: torch.Tensor
        attribute_logits: torch.Tensor | None
        category_logits: torch.Tensor | None
        names: list[str]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def line(*xs: float) -> torch.Tensor:
    """1-D points as (N, 1) features, so every distance is |x_i - x_j|."""
    return torch.tensor([[float(x)] for x in xs], requires_grad=True)


# Four points on a line, two items: A = {0, 1}, B = {3, 6}. Distances:
#   d(0,1)=1  d(0,3)=3  d(0,6)=6  d(1,3)=2  d(1,6)=5  d(3,6)=3
# anchor 0: hardest pos 1, hardest neg 3 -> gap 1-3+m
# anchor 1: hardest pos 1, hardest neg 2 -> gap 1-2+m
# anchor 3: hardest pos 3, hardest neg 2 -> gap 3-2+m
# anchor 6: hardest pos 3, hardest neg 5 -> gap 3-5+m
LABELS = torch.tensor([0, 0, 1, 1])


def test_batch_hard_value_by_hand() -> None:
    m = 0.5
    # gaps -1.5, -0.5, 1.5, -1.5 -> hinge 0, 0, 1.5, 0
    loss = batch_hard_triplet(line(0, 1, 3, 6), LABELS, margin=m)
    assert loss.item() == pytest.approx(1.5 / 4, abs=1e-6)
    soft = batch_hard_triplet(line(0, 1, 3, 6), LABELS, margin=m, soft_margin=True)
    expected = (2 * softplus(-1.5) + softplus(-0.5) + softplus(1.5)) / 4
    assert soft.item() == pytest.approx(expected, abs=1e-6)


def test_batch_hard_uses_only_the_hardest_pair() -> None:
    m = 0.5
    # Only anchor 3 is active; its hardest negative is x=1, so x=0 is in no active triplet:
    # moving it (0 -> -0.4, anchor 0 stays inactive: 1.4-3.4+0.5 < 0) leaves the loss unchanged
    # and its gradient is 0.
    x = line(0, 1, 3, 6)
    loss = batch_hard_triplet(x, LABELS, margin=m)
    loss.backward()
    assert x.grad[0].item() == 0.0
    assert x.grad[1].item() != 0.0
    moved = batch_hard_triplet(line(-0.4, 1, 3, 6), LABELS, margin=m)
    assert moved.item() == pytest.approx(loss.item(), abs=1e-6)
    # Moving the hardest negative 1 -> 1.2 changes it: anchor 3 gap 3-1.8+0.5 = 1.7, the
    # others stay inactive (anchor 1: 1.2-1.8+0.5 = -0.1).
    closer = batch_hard_triplet(line(0, 1.2, 3, 6), LABELS, margin=m)
    assert closer.item() == pytest.approx(1.7 / 4, abs=1e-6)


# Improved trihard case: item A = consumer 0, consumer 3, shop 1; item B = consumer 4, shop 6.
# All pairs (m = 0.5): anchor 3 (A, consumer): hardest pos 0 (d 3), nearest neg 4 (d 1) -> 2.5;
#   anchor 4 (B, consumer): pos 6 (d 2), nearest neg 3 (d 1) -> 1.5; the other three are inactive
#   (0: 3-4+.5, 1: 2-3+.5, 6: 2-3+.5)                                       -> mean 4/5 = 0.8.
# Cross-domain pairs only: 0: pos 1 (d 1) vs neg 6 (d 6); 3: pos 1 (d 2) vs neg 6 (d 3);
#   1: pos 3 (d 2) vs neg 4 (d 3); 4: pos 6 (d 2) vs neg 1 (d 3); 6: pos 4 (d 2) vs neg 3 (d 3):
#   every gap <= -0.5                                                         -> 0.
# Both active all-pairs triplets come from the consumer photo at 3 sitting next to B's consumer
# photo at 4: a confusion no consumer -> shop query sees, which the cross term ignores.
X_DOMAINS = (0.0, 3.0, 1.0, 4.0, 6.0)
X_LABELS = torch.tensor([0, 0, 0, 1, 1])
X_SHOP = torch.tensor([0, 0, 1, 0, 1])


def test_improved_trihard_value_by_hand() -> None:
    m = 0.5
    assert batch_hard_triplet(line(*X_DOMAINS), X_LABELS, m).item() == pytest.approx(0.8, abs=1e-6)
    for w, expected in ((0.0, 0.8), (0.5, 0.4), (0.25, 0.6), (1.0, 0.0)):
        loss = improved_trihard(line(*X_DOMAINS), X_LABELS, X_SHOP, m, cross_weight=w)
        assert loss.item() == pytest.approx(expected, abs=1e-6), w


def _naive_improved(x: torch.Tensor, labels: list[int], domains: list[int], m: float, w: float) -> float:
    """Loop-by-loop reference: every anchor, every pair, no masking tricks."""
    def term(cross: bool) -> float:
        gaps = []
        for a in range(len(labels)):
            keep = [j for j in range(len(labels)) if j != a and (not cross or domains[j] != domains[a])]
            pos = [float(torch.dist(x[a], x[j])) for j in keep if labels[j] == labels[a]]
            neg = [float(torch.dist(x[a], x[j])) for j in keep if labels[j] != labels[a]]
            if pos and neg:
                gaps.append(max(0.0, max(pos) - min(neg) + m))
        return sum(gaps) / len(gaps) if gaps else 0.0

    return (1 - w) * term(False) + w * term(True)


def test_improved_trihard_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(16, 6, generator=gen)
    labels = torch.arange(4).repeat_interleave(4)
    domains = torch.tensor([0, 0, 0, 1] * 3 + [0, 0, 0, 0])  # the last item has no shop photo in the batch
    loss = improved_trihard(feats, labels, domains, 0.3, cross_weight=0.3)
    assert loss.item() == pytest.approx(_naive_improved(feats, labels.tolist(), domains.tolist(), 0.3, 0.3),
                                        abs=1e-5)


def test_improved_trihard_is_batch_hard_on_single_domain_data() -> None:
    feats = torch.randn(12, 8)
    labels = torch.arange(4).repeat_interleave(3)
    same = torch.zeros(12, dtype=torch.long)
    assert improved_trihard(feats, labels, same, 0.3).item() == pytest.approx(
        batch_hard_triplet(feats, labels, 0.3).item(), abs=1e-6)


def test_improved_trihard_cross_term_sends_no_gradient_to_same_domain_confusions() -> None:
    # With the cross term alone (w = 1) the consumer photo at 3, whose only active triplets were
    # consumer-consumer ones, is pulled by nothing: every cross gap is inactive.
    x = line(*X_DOMAINS)
    improved_trihard(x, X_LABELS, X_SHOP, 0.5, cross_weight=1.0).backward()
    assert torch.count_nonzero(x.grad) == 0
    # Move B's shop photo next to A's (1 -> 1.5 vs 6): now A's consumer photos mine it as their
    # nearest cross-domain negative, and it gets a gradient.
    y = line(0.0, 3.0, 1.0, 4.0, 1.5)
    improved_trihard(y, X_LABELS, X_SHOP, 0.5, cross_weight=1.0).backward()
    assert y.grad[4].item() != 0.0


def test_improved_trihard_rejects_bad_arguments() -> None:
    feats = torch.randn(4, 3)
    with pytest.raises(ValueError, match="cross_weight"):
        improved_trihard(feats, LABELS, torch.tensor([0, 1, 0, 1]), 0.3, cross_weight=1.5)
    with pytest.raises(ValueError, match="domains"):
        improved_trihard(feats, LABELS, torch.tensor([0, 1]), 0.3)


def test_duplicate_features_give_finite_values_and_gradients() -> None:
    base = torch.randn(3, 5)
    # rows 0,1 identical (same item), row 2 identical to row 3 of another item
    feats = torch.cat([base[:1], base[:1], base[1:2], base[1:2], base[2:]]).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1])
    domains = torch.tensor([0, 1, 0, 1, 0])
    for loss in (
        improved_trihard(feats, labels, domains, 0.3),
        batch_hard_triplet(feats, labels, 0.3),
        batch_hard_triplet(feats, labels, 0.3, soft_margin=True),
    ):
        feats.grad = None
        loss.backward()
        assert math.isfinite(loss.item())
        assert torch.isfinite(feats.grad).all()
    collapsed = torch.zeros(4, 3, requires_grad=True)  # every feature identical: every gap is the margin
    loss = improved_trihard(collapsed, LABELS, torch.tensor([0, 1, 0, 1]), 0.3)
    loss.backward()
    assert loss.item() == pytest.approx(0.3, abs=1e-5)
    assert torch.isfinite(collapsed.grad).all()


def test_anchors_without_positives_or_negatives() -> None:
    feats = torch.randn(3, 4, requires_grad=True)
    one_item = torch.tensor([5, 5, 5])  # no negatives anywhere
    domains = torch.tensor([0, 1, 0])
    for loss in (batch_hard_triplet(feats, one_item, 0.3), improved_trihard(feats, one_item, domains, 0.3)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(feats.grad).all()


def test_losses_stay_float32_under_bf16_autocast() -> None:
    feats = torch.randn(8, 16).to(torch.bfloat16)
    labels = torch.arange(4).repeat_interleave(2)
    domains = torch.tensor([0, 1] * 4)
    reference = improved_trihard(feats.float(), labels, domains, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = improved_trihard(feats, labels, domains, 0.3)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_training_with_improved_trihard_reduces_the_loss() -> None:
    items, per_item = 4, 4
    protos = torch.randn(items, 16)
    inputs = protos.repeat_interleave(per_item, 0) + 0.8 * torch.randn(items * per_item, 16)
    labels = torch.arange(items).repeat_interleave(per_item)
    domains = torch.tensor([0, 0, 0, 1] * items)
    embed = torch.nn.Linear(16, 8)
    opt = torch.optim.Adam(embed.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = improved_trihard(embed(inputs), labels, domains, margin=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_center_loss_value_and_rescaled_gradient() -> None:
    center = CenterLoss(num_classes=2, dim=2)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    # ||(1,0)-(0,0)||^2 = 1, ||(0,2)-(1,1)||^2 = 2 -> mean 1.5
    loss = center(feats, labels)
    assert loss.item() == pytest.approx(1.5)
    weight = 5e-4
    (weight * loss).backward()
    # d/dc_y mean ||x - c_y||^2 = -2 (x - c_y) / B: c0 -> -(1, 0), c1 -> -(-1, 1)
    assert torch.allclose(center.centers.grad, weight * torch.tensor([[-1.0, 0.0], [1.0, -1.0]]))
    rescale_center_grads(center.centers, weight)
    assert torch.allclose(center.centers.grad, torch.tensor([[-1.0, 0.0], [1.0, -1.0]]), atol=1e-6)
    torch.optim.SGD([center.centers], lr=0.5).step()
    assert torch.allclose(center.centers.detach(), torch.tensor([[0.5, 0.0], [0.5, 1.5]]), atol=1e-6)


def test_id_cross_entropy_with_smoothing_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 1])
    e, c = 0.1, 3
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        expected += -(1 - e) * log_p[y] - (e / c) * sum(log_p)
    expected /= 2
    assert id_cross_entropy(logits, labels, e).item() == pytest.approx(expected, abs=1e-6)


def test_attribute_bce_masks_unknown_labels() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[1, -1, 0], [0, 1, -1]], dtype=torch.int8)
    # known: (y=1, x=0) log 2; (y=0, x=2) softplus(2); (y=1, x=0) log 2; (y=0, x=1) softplus(1)
    expected = (2 * math.log(2) + softplus(2.0) + softplus(1.0)) / 4
    loss = attribute_bce(logits, targets)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logits.grad[0, 2].item() == 0.0 and logits.grad[1, 0].item() == 0.0
    changed = logits.detach().clone()
    changed[0, 2], changed[1, 0] = 50.0, -50.0  # where the label is unknown
    assert attribute_bce(changed, targets).item() == pytest.approx(expected, abs=1e-6)
    nothing_known = attribute_bce(logits, torch.zeros_like(targets))
    assert nothing_known.item() == 0.0


def test_category_cross_entropy_ignores_unknown() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0], [9.0, -9.0]])
    cats = torch.tensor([0, 1, -1])
    expected = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    assert category_cross_entropy(logits, cats).item() == pytest.approx(expected, abs=1e-6)
    assert category_cross_entropy(logits, torch.full((3,), -1)).item() == 0.0


def _train_output(n_items: int = 3, k: int = 2, dims: tuple[int, ...] = (6, 4), attrs: int = 5) -> TrainOutput:
    n = n_items * k
    feats = [torch.randn(n, d, requires_grad=True) for d in dims]
    return TrainOutput(
        features=feats,
        logits=[torch.randn(n, n_items, requires_grad=True) for _ in dims],
        global_feature=feats[0],
        attribute_logits=torch.randn(n, attrs, requires_grad=True),
        category_logits=torch.randn(n, 4, requires_grad=True),
        names=[f"b{i}" for i in range(len(dims))],
    )


def test_multitask_total_is_the_weighted_sum_of_the_terms() -> None:
    out = _train_output()
    labels = torch.arange(3).repeat_interleave(2)
    attrs = torch.tensor([[1, -1, 0, 0, 1]] * 6, dtype=torch.int8)
    cats = torch.tensor([0, 0, 2, 2, -1, -1])
    w = {"id": 0.7, "triplet": 1.3, "center": 5e-4, "attr": 0.4, "cat": 0.2}
    crit = MultiTaskLoss(
        num_items=3, global_dim=6, id_weight=w["id"], triplet_weight=w["triplet"], center_weight=w["center"],
        attribute_weight=w["attr"], category_weight=w["cat"], triplet="batch_hard", margin=0.3,
    )
    total, tensors = crit(out, labels, attrs, cats)
    assert all(t.ndim == 0 and not t.requires_grad for t in tensors.values())  # read later, in one sync
    terms = terms_to_floats(tensors)
    assert set(terms) == {"id", "triplet", "center", "attr", "cat", "total"}
    assert total.item() == pytest.approx(sum(w[k] * terms[k] for k in w), rel=1e-6)
    assert terms["total"] == pytest.approx(total.item())
    # each term is what its function gives: ID and triplet averaged over all embeddings
    ids = [id_cross_entropy(lg, labels, 0.1).item() for lg in out.logits]
    tris = [batch_hard_triplet(f, labels, 0.3).item() for f in out.features]
    assert terms["id"] == pytest.approx(sum(ids) / 2, rel=1e-6)
    assert terms["triplet"] == pytest.approx(sum(tris) / 2, rel=1e-6)
    assert terms["attr"] == pytest.approx(attribute_bce(out.attribute_logits, attrs).item(), rel=1e-6)
    assert terms["center"] == pytest.approx(crit.center(out.global_feature, labels).item(), rel=1e-6)
    total.backward()
    assert crit.center.centers.grad is not None
    assert all(f.grad is not None for f in out.features)


def test_batched_triplets_equal_one_call_per_embedding() -> None:
    gen = torch.Generator().manual_seed(7)
    stacked = torch.randn(5, 12, 8, generator=gen, requires_grad=True)  # 5 embeddings of 12 images
    labels = torch.arange(4).repeat_interleave(3)
    domains = torch.tensor([0, 0, 1] * 4)
    for fn in (lambda f: batch_hard_triplet(f, labels, 0.3),
               lambda f: batch_hard_triplet(f, labels, 0.3, soft_margin=True),
               lambda f: improved_trihard(f, labels, domains, 0.3, 0.4)):
        batched = fn(stacked)
        assert batched.shape == (5,)
        one_by_one = torch.stack([fn(stacked[h]) for h in range(5)])
        assert torch.allclose(batched, one_by_one, atol=1e-6)
        grad_batched, = torch.autograd.grad(batched.sum(), stacked)
        grad_loop, = torch.autograd.grad(one_by_one.sum(), stacked)
        assert torch.allclose(grad_batched, grad_loop, atol=1e-6)


def test_multitask_groups_mixed_widths_like_a_per_head_loop() -> None:
    # widths 6, 4, 6, 4, 4: two batched triplet passes, one ID call, same values as a loop
    out = _train_output(dims=(6, 4, 6, 4, 4))
    labels = torch.arange(3).repeat_interleave(2)
    domains = torch.tensor([0, 1] * 3)
    crit = MultiTaskLoss(num_items=3, global_dim=6, center_weight=0.0, attribute_weight=0.0)
    _, terms = crit(out, labels, domains=domains)
    tris = [improved_trihard(f, labels, domains, 0.3).item() for f in out.features]
    ids = [id_cross_entropy(lg, labels, 0.1).item() for lg in out.logits]
    assert terms["triplet"].item() == pytest.approx(sum(tris) / 5, rel=1e-6)
    assert terms["id"].item() == pytest.approx(sum(ids) / 5, rel=1e-6)


def test_multitask_weight_zero_disables_a_term() -> None:
    out = _train_output()
    labels = torch.arange(3).repeat_interleave(2)
    attrs = torch.ones(6, 5, dtype=torch.int8)
    domains = torch.tensor([0, 1] * 3)
    full = MultiTaskLoss(num_items=3, global_dim=6, center_weight=0.0)
    no_attr = MultiTaskLoss(num_items=3, global_dim=6, center_weight=0.0, attribute_weight=0.0)
    t_full, terms_full = full(out, labels, attrs, domains=domains)
    t_no, terms_no = no_attr(out, labels, attrs, domains=domains)
    assert "center" not in terms_full and full.center_parameters() == []
    assert "cat" not in terms_full  # category weight defaults to 0
    assert "attr" not in terms_no
    assert t_full.item() - t_no.item() == pytest.approx(terms_full["attr"].item(), rel=1e-5)
    no_triplet = MultiTaskLoss(num_items=3, global_dim=6, center_weight=0.0, triplet_weight=0.0)
    assert "triplet" not in no_triplet(out, labels, attrs)[1]
    # absent inputs (no attribute labels in this dataset) skip the term rather than fail
    assert "attr" not in full(out, labels, None, domains=domains)[1]


def test_multitask_improved_trihard_uses_the_domains() -> None:
    out = _train_output()
    labels = torch.arange(3).repeat_interleave(2)
    domains = torch.tensor([0, 1] * 3)
    crit = MultiTaskLoss(num_items=3, global_dim=6, center_weight=0.0, attribute_weight=0.0,
                         cross_domain_weight=0.7)
    _, terms = crit(out, labels, domains=domains)
    expected = [improved_trihard(f, labels, domains, 0.3, 0.7).item() for f in out.features]
    assert terms["triplet"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    with pytest.raises(ValueError, match="domain"):
        crit(out, labels)


def test_build_criterion_reads_the_config_and_center_grads_rescale() -> None:
    cfg = Config()
    cfg.loss.triplet = "batch_hard"
    cfg.loss.margin = 0.5
    cfg.loss.center_weight = 1e-2
    crit = build_criterion(cfg, num_items=3, global_dim=6)
    assert crit.triplet == "batch_hard" and crit.margin == 0.5
    (params,) = crit.center_parameters()
    assert params.shape == (3, 6)
    out = _train_output()
    labels = torch.arange(3).repeat_interleave(2)
    total, _ = crit(out, labels)
    total.backward()
    before = params.grad.clone()
    crit.rescale_center_grads()
    assert torch.allclose(params.grad, before / 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_matches_cpu() -> None:
    out = _train_output()
    labels = torch.arange(3).repeat_interleave(2)
    attrs = torch.tensor([[1, -1, 0, 0, 1]] * 6, dtype=torch.int8)
    cats = torch.tensor([0, 0, 2, 2, -1, -1])
    crit = MultiTaskLoss(num_items=3, global_dim=6, category_weight=1.0)
    domains = torch.tensor([0, 1] * 3)
    _, cpu_terms = crit(out, labels, attrs, cats, domains)
    cpu_terms = terms_to_floats(cpu_terms)
    dev = torch.device("cuda")
    gpu_out = TrainOutput(
        features=[f.detach().to(dev).to(torch.bfloat16).requires_grad_() for f in out.features],
        logits=[lg.detach().to(dev) for lg in out.logits],
        global_feature=out.global_feature.detach().to(dev),
        attribute_logits=out.attribute_logits.detach().to(dev),
        category_logits=out.category_logits.detach().to(dev),
        names=out.names,
    )
    crit.to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, gpu_terms = crit(gpu_out, labels.to(dev), attrs.to(dev), cats.to(dev), domains.to(dev))
    gpu_terms = terms_to_floats(gpu_terms)
    assert total.dtype == torch.float32
    total.backward()
    assert all(torch.isfinite(f.grad).all() for f in gpu_out.features)
    for key in ("id", "center", "attr", "cat"):
        assert gpu_terms[key] == pytest.approx(cpu_terms[key], rel=1e-4)
    # features were rounded to bf16 on the way in; distances themselves are float32
    assert gpu_terms["triplet"] == pytest.approx(cpu_terms["triplet"], rel=2e-2)
