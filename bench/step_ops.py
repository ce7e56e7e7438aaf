"""Host-side cost of one MMFL-Net training step: operator launches per phase, per-head loss loop vs batched.

On the H100 the eager step was host-bound: 56 ms of GPU kernels in an 82 ms step
(``docs/results/gpu_profile.txt``). Every aten operator is at least one kernel launch there, so
the operator count per step is a device-independent measure of that host cost. This counts the
outermost aten operators of the forward pass, the loss, its backward (with the model's) and the
optimizer, for two criteria in the same run:

* ``per-head loop``: one triplet and one ID cross-entropy call per embedding (11 for ``mmfl``),
  as mmfl computed them up to 2026-11-28;
* ``batched``: :class:`mmfl.losses.MultiTaskLoss`, one pass per embedding width.

It also times the loss forward + backward on the CPU (median of ``--repeats``). The optimizer is
counted as the CPU runs it (a per-parameter loop); on CUDA it is the fused AdamW, a few kernels.

    python bench/step_ops.py --backbone resnet50 --size 64
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

from mmfl.config import load_config
from mmfl.losses import MultiTaskLoss, build_criterion
from mmfl.losses.classification import id_cross_entropy
from mmfl.models import build_model
from mmfl.train.trainer import build_optimizer

PHASES = ("forward", "loss", "backward", "optimizer")


class PerHeadLoss(MultiTaskLoss):
    """The baseline: the same terms, one call per embedding."""

    def _id_mean(self, logits: list[Tensor], labels: Tensor) -> Tensor:
        return torch.stack([id_cross_entropy(lg, labels, self.label_smoothing) for lg in logits]).mean()

    def _triplet_mean(self, features: list[Tensor], labels: Tensor, domains: Tensor | None) -> Tensor:
        return torch.stack([self._triplet(f, labels, domains) for f in features]).mean()


def count_ops(model: torch.nn.Module, criterion: MultiTaskLoss, batch: dict[str, Tensor]) -> dict[str, int]:
    """Outermost aten operators per phase of one step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(load_config("mmfl"), model, torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("forward"):
            out = model(batch["images"])
        with record_function("loss"):
            total, _ = criterion(out, batch["labels"], batch["attributes"], None, batch["domains"])
        with record_function("backward"):
            total.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=True)
            optimizer.step()
    counts: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        while parent is not None and parent.name not in PHASES:
            parent = parent.cpu_parent
        counts[parent.name if parent is not None else "backward"] += 1  # autograd threads: the backward
    model.zero_grad(set_to_none=True)
    return {phase: counts[phase] for phase in PHASES}


def loss_seconds(model: torch.nn.Module, criterion: MultiTaskLoss, batch: dict[str, Tensor], repeats: int) -> float:
    """Median seconds of the loss forward + backward (the features are computed once, outside)."""
    with torch.no_grad():
        out = model(batch["images"])
    times = []
    for _ in range(repeats):
        feats = [f.detach().requires_grad_() for f in out.features]
        logits = [lg.detach().requires_grad_() for lg in out.logits]
        detached = type(out)(**{**vars(out), "features": feats, "logits": logits,
                                "global_feature": feats[0]})
        t0 = time.perf_counter()
        total, _ = criterion(detached, batch["labels"], batch["attributes"], None, batch["domains"])
        total.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=64, help="input size (op counts do not depend on it)")
    ap.add_argument("--items", type=int, default=5000, help="ID classes")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("mmfl", [f"model.backbone={args.backbone}", "model.pretrained=none", f"input.size={args.size}"])
    p, k = cfg.train.batch_items, cfg.train.images_per_item
    batch = {"images": torch.rand(p * k, 3, args.size, args.size), "labels": torch.arange(p).repeat_interleave(k),
             "domains": torch.tensor(([0] * (k - 1) + [1]) * p),
             "attributes": torch.randint(-1, 2, (p * k, 303)).to(torch.int8)}
    model = build_model(cfg, args.items, 303).train()
    rows = {}
    for name, cls in (("per-head loop", PerHeadLoss), ("batched", MultiTaskLoss)):
        reference = build_criterion(cfg, args.items, model.global_dim)
        criterion = cls(num_items=args.items, global_dim=model.global_dim, cross_domain_weight=cfg.loss.cross_domain_weight,
                        center_weight=cfg.loss.center_weight, attribute_weight=cfg.loss.attribute_weight)
        criterion.load_state_dict(reference.state_dict())
        rows[name] = {"ops": count_ops(model, criterion, batch),
                      "loss_fwd_bwd_ms": 1e3 * loss_seconds(model, criterion, batch, args.repeats)}
    print(f"mmfl preset, {args.backbone}, {len(model(batch['images']).features)} embeddings, "
          f"batch {p} x {k}, {args.items} ID classes, 1 thread")
    print("| criterion | forward ops | loss ops | backward ops | optimizer ops (CPU loop) | loss fwd+bwd ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        o = r["ops"]
        print(f"| {name} | {o['forward']} | {o['loss']} | {o['backward']} | {o['optimizer']} | "
              f"{r['loss_fwd_bwd_ms']:.1f} |")
    if args.json:
        from mmfl.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"rows": rows, "args": vars(args) | {"json": str(args.json)}},
                                                indent=1) + "\n")


if __name__ == "__main__":
    main()
