"""MMFL-Net from a config: the glue between ``cfg.model`` (presets, overrides) and the plain-argument model.

:class:`~mmfl.models.mmfl_net.MMFLNet` takes a backbone module and sizes, so it builds and tests without
a config; this module reads the config, makes the backbone, loads its initial weights and freezes
what the config freezes.
"""
from __future__ import annotations

import logging

from mmfl.config import Config
from mmfl.errors import MMFLError
from mmfl.models.backbones import Backbone
from mmfl.models.mmfl_net import MMFLNet
from mmfl.models.pretrained import load_pretrained

log = logging.getLogger(__name__)


def build_model(cfg: Config, num_items: int, num_attributes: int, num_categories: int = 0,
                num_box_categories: int = 0) -> MMFLNet:
    """Build MMFL-Net from ``cfg.model``; sizes come from the data (heads off when 0 or switched off).

    ``num_box_categories``: categories the box head names (0: boxes without a category); used
    only with ``model.box_head``.
    """
    m = cfg.model
    if num_items < 1:
        raise MMFLError(f"num_items must be at least 1 to build the ID classifiers, got {num_items}")
    backbone = Backbone(m.backbone, last_stride=m.last_stride)
    source = load_pretrained(backbone, m.pretrained)
    if m.backbone_norm == "frozen":
        backbone.freeze_batchnorm()
    backbone.freeze(m.freeze_stages)
    model = MMFLNet(
        backbone,
        m.branches,
        num_items,
        num_attributes if m.attribute_head else 0,
        num_categories if m.category_head else 0,
        fusion=m.fusion,
        fusion_levels=m.fusion_levels,
        neck_width=m.neck_width,
        box_head=m.box_head,
        box_level=m.box_level,
        box_source=m.box_source,
        box_width=m.box_width,
        num_box_categories=num_box_categories,
    )
    log.info("built %s/%s: embed_dim %d, backbone from %s", m.backbone, m.fusion, model.embed_dim, source)
    return model
