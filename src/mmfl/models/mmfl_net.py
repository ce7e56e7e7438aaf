"""MMFL-Net: backbone pyramid -> semantic-spatial fusion neck -> data-described branches -> heads.

Our reading of Bao et al. 2022 (DESIGN.md section 2). Every idea of the paper is a switch:
``fusion`` (none / topdown / bidirectional) and the list of :class:`~mmfl.config.BranchSpec`
(global, part-informed stripes, local grid) describe the architecture, so ablations and the
``global``/``mgn`` baselines are configs of this one class rather than other models.

Forward contract (others code against it):
* train mode: :class:`TrainOutput` with one pre-BN feature, post-BN feature and ID-logit tensor per
  embedding, plus attribute/category logits;
* eval mode: the retrieval embedding, concatenated post-BN features L2-normalised, float32;
* :meth:`MMFLNet.predict`: the embedding plus attribute/category logits;
* :meth:`MMFLNet.detect` (models built with ``box_head``): garment boxes of whole photos
  (:mod:`mmfl.models.box_head`); the head reads its own map and never touches the embedding.
Inputs are float images in [0, 1] of any size >= 32; ImageNet normalisation happens inside.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfl.config import BranchSpec, parse_partition
from mmfl.errors import MMFLError
from mmfl.models.backbones import LEVELS, Backbone
from mmfl.models.box_head import BoxDetections, BoxHead, BoxMaps, decode_boxes
from mmfl.models.neck import FusionNeck

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainOutput:
    """What the losses consume; lists are aligned, one entry per (branch, part) embedding."""

    features: list[torch.Tensor]  # pre-BN embeddings (N, dim_i): metric losses
    logits: list[torch.Tensor]  # ID logits (N, num_items) from the post-BN embeddings
    global_feature: torch.Tensor  # pre-BN feature of the first branch: center loss
    attribute_logits: torch.Tensor | None  # (N, A) multi-label logits
    category_logits: torch.Tensor | None  # (N, C)
    names: list[str]  # "global", "part2.whole", "part2.0", ...
    bn_features: list[torch.Tensor] = field(default_factory=list)  # post-BN embeddings (N, dim_i)


@dataclass
class Prediction:
    embedding: torch.Tensor  # (N, D) L2-normalised, float32
    attribute_logits: torch.Tensor | None
    category_logits: torch.Tensor | None


class PartPool(nn.Module):
    """Pools a map into a ``rows x cols`` grid of vectors; windows follow the map's size.

    The windows are those of adaptive pooling (row ``i`` spans ``floor(i*H/rows)`` to
    ``ceil((i+1)*H/rows)``), so any input size works, even one with fewer rows than stripes;
    they are written as slices because ONNX export refuses adaptive pooling whose output does not
    divide its input. ``gem`` is generalised-mean pooling with a learnable exponent (p=3 start;
    p=1 is avg, large p tends to max), computed in float32 because x**p in bfloat16 loses the
    small activations.
    """

    def __init__(self, kind: str, rows: int, cols: int) -> None:
        super().__init__()
        if kind not in ("avg", "max", "gem"):
            raise ValueError(f"unknown pooling '{kind}' (avg, max, gem)")
        self.kind, self.rows, self.cols = kind, rows, cols
        self.p = nn.Parameter(torch.tensor(3.0)) if kind == "gem" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, rows * cols), parts in row-major order."""
        height, width = x.shape[-2:]
        if self.p is not None:
            p = self.p.float().clamp(min=1.0)
            x = x.float().clamp(min=1e-6).pow(p)
        parts = []
        # ceil as (a + b - 1) // b: operands stay non-negative, where ONNX's truncating Div and
        # Python's floor division agree (the exporter traces this arithmetic on the map's size)
        for r in range(self.rows):
            top, bottom = r * height // self.rows, ((r + 1) * height + self.rows - 1) // self.rows
            for c in range(self.cols):
                left, right = c * width // self.cols, ((c + 1) * width + self.cols - 1) // self.cols
                window = x[:, :, top:bottom, left:right]
                parts.append(window.amax(dim=(2, 3)) if self.kind == "max" else window.mean(dim=(2, 3)))
        pooled = torch.stack(parts, dim=2)
        return pooled.pow(1.0 / p) if self.p is not None else pooled


class EmbeddingHead(nn.Module):
    """Reduction (linear + BN + ReLU) to ``dim``, BNNeck, bias-free ID classifier (BoT recipe).

    The BNNeck's shift is frozen at zero so the post-BN feature stays centred for cosine
    retrieval and the classifier's decision boundaries pass through the origin.
    """

    def __init__(self, in_dim: int, dim: int, num_items: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_items, bias=False)
        nn.init.kaiming_normal_(self.reduce[0].weight, mode="fan_out")
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, in_dim) -> (pre-BN feature, post-BN feature), each (N, dim)."""
        feature = self.reduce(pooled)
        return feature, self.bnneck(feature)


class Branch(nn.Module):
    """One :class:`BranchSpec`: pool its level's map into parts (plus the whole map if asked) and
    give each part its own embedding head."""

    def __init__(self, spec: BranchSpec, in_channels: int, num_items: int) -> None:
        super().__init__()
        rows, cols = parse_partition(spec.partition, f"branch '{spec.name}' partition")
        self.level = spec.level
        self.parts = PartPool(spec.pooling, rows, cols)
        partitioned = rows * cols > 1
        self.whole = PartPool(spec.pooling, 1, 1) if partitioned and spec.with_whole else None
        self.names: list[str] = []
        if self.whole is not None:
            self.names.append(f"{spec.name}.whole")
        self.names += [f"{spec.name}.{i}" for i in range(rows * cols)] if partitioned else [spec.name]
        self.heads = nn.ModuleList(EmbeddingHead(in_channels, spec.dim, num_items) for _ in self.names)
        self.dims = [spec.dim] * len(self.names)

    def forward(self, fmap: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pooled = self.parts(fmap)
        vectors = [pooled[:, :, i] for i in range(pooled.shape[2])]
        if self.whole is not None:
            vectors.insert(0, self.whole(fmap)[:, :, 0])
        return [head(v) for head, v in zip(self.heads, vectors)]


class MMFLNet(nn.Module):
    """The retrieval model; see the module docstring for the forward contract.

    Built from plain arguments (a backbone module, branch specs, sizes from the data); use
    :func:`mmfl.models.build_model` to build it from a :class:`~mmfl.config.Config`. The backbone's
    stages above the deepest level the neck or a branch reads are dropped (see ``Backbone.truncate``).
    """

    def __init__(
        self,
        backbone: Backbone,
        branches: Sequence[BranchSpec],
        num_items: int,
        num_attributes: int = 0,
        num_categories: int = 0,
        fusion: str = "none",
        fusion_levels: Sequence[int] = (4, 5),
        neck_width: int = 256,
        box_head: bool = False,
        box_level: int = 4,
        box_source: str = "backbone",
        box_width: int = 64,
        num_box_categories: int = 0,
    ) -> None:
        super().__init__()
        if fusion not in ("none", "topdown", "bidirectional"):
            raise ValueError(f"unknown fusion '{fusion}' (none, topdown, bidirectional)")
        if not branches:
            raise ValueError("at least one branch is needed")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # A branch reads the fused map at its level when fusion is on and it asks for one,
        # otherwise the backbone stage itself.
        self.reads_fused = [fusion != "none" and b.source == "fused" for b in branches]
        fused = sorted({b.level for b, f in zip(branches, self.reads_fused) if f})
        deepest = max(b.level for b in branches)
        backbone.truncate(max(deepest, *fusion_levels) if fused else deepest)
        self.backbone = backbone
        self.neck: FusionNeck | None = None
        if fused:
            self.neck = FusionNeck(
                backbone.channels, backbone.strides, fusion_levels, fused, neck_width, bottom_up=fusion == "bidirectional"
            )
        self.branches = nn.ModuleList(
            Branch(spec, neck_width if f else backbone.channels[spec.level], num_items)
            for spec, f in zip(branches, self.reads_fused)
        )
        self.names = [n for b in self.branches for n in b.names]
        self.dims = [d for b in self.branches for d in b.dims]
        self.embed_dim = sum(self.dims)
        self.global_dim = self.dims[0]
        self.num_items = num_items
        self.num_attributes = num_attributes
        self.num_categories = num_categories
        self.attribute_head = nn.Linear(self.embed_dim, num_attributes) if num_attributes > 0 else None
        self.category_head = nn.Linear(self.embed_dim, num_categories) if num_categories > 0 else None
        # Built last and on a forked random stream, so the retrieval layers, and everything the
        # trainer draws after building the model, see the same random numbers with or without it.
        self.box_head: BoxHead | None = None
        self.box_level = box_level
        self.box_reads_fused = box_source == "fused"
        if box_head:
            if self.box_reads_fused and (self.neck is None or box_level not in self.neck.out_levels):
                raise ValueError(f"box head: no fused map at level {box_level} (the neck outputs "
                                 f"{self.neck.out_levels if self.neck is not None else 'nothing'})")
            if box_level not in backbone.channels:
                raise ValueError(f"box head: level {box_level} is not computed (levels {sorted(backbone.channels)})")
            channels = neck_width if self.box_reads_fused else backbone.channels[box_level]
            with torch.random.fork_rng(devices=[]):
                self.box_head = BoxHead(channels, num_box_categories, box_width)

    def _embed(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-BN and post-BN features of every embedding, in ``self.names`` order."""
        x = (x - self.mean) / self.std  # a new tensor: the caller's images are never modified
        pyramid = self.backbone(x)
        fused = self.neck(pyramid) if self.neck is not None else {}
        pre: list[torch.Tensor] = []
        post: list[torch.Tensor] = []
        for branch, reads_fused in zip(self.branches, self.reads_fused):
            for feature, normed in branch((fused if reads_fused else pyramid)[branch.level]):
                pre.append(feature)
                post.append(normed)
        return pre, post

    def _heads(self, joined: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        attrs = self.attribute_head(joined) if self.attribute_head is not None else None
        cats = self.category_head(joined) if self.category_head is not None else None
        return attrs, cats

    def forward(self, x: torch.Tensor) -> TrainOutput | torch.Tensor:
        pre, post = self._embed(x)
        if not self.training:
            return F.normalize(torch.cat(post, dim=1).float(), dim=1)
        heads = [head for branch in self.branches for head in branch.heads]
        logits = [head.classifier(f) for head, f in zip(heads, post)]
        attrs, cats = self._heads(torch.cat(post, dim=1))
        return TrainOutput(pre, logits, pre[0], attrs, cats, list(self.names), post)

    def predict(self, x: torch.Tensor) -> Prediction:
        """Embedding plus attribute/category logits in one pass (call in eval mode)."""
        _, post = self._embed(x)
        joined = torch.cat(post, dim=1)
        attrs, cats = self._heads(joined)
        return Prediction(F.normalize(joined.float(), dim=1), attrs, cats)

    def box_maps(self, x: torch.Tensor) -> BoxMaps:
        """The box head's raw maps for whole photos ``x`` (training and :meth:`detect`).

        Reading the backbone, only the stages up to ``box_level`` run (a partial pass: the
        detection costs less than an embedding at the same size); reading the fused map, the
        backbone and neck run whole.
        """
        if self.box_head is None:
            raise MMFLError("this model has no box head (train with model.box_head=true)")
        x = (x - self.mean) / self.std
        if self.box_reads_fused:
            fmap = self.neck(self.backbone(x))[self.box_level]
        else:
            for level, stage in zip(LEVELS, self.backbone._stages):  # the Backbone's own stage list
                x = stage(x)
                if level == self.box_level:
                    break
            fmap = x
        return self.box_head(fmap)

    def detect(self, x: torch.Tensor, max_boxes: int = 10) -> BoxDetections:
        """Top ``max_boxes`` garment boxes per image of ``x`` in its pixels, best first (call in eval mode)."""
        return decode_boxes(self.box_maps(x), (x.shape[-2], x.shape[-1]), max_boxes)
