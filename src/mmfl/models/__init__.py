"""MMFL-Net and its parts: torchvision backbones, pretrained loading, fusion neck, branches, heads."""
from mmfl.models.backbones import BACKBONES, Backbone
from mmfl.models.build import build_model
from mmfl.models.mmfl_net import MMFLNet, Prediction, TrainOutput

__all__ = ["BACKBONES", "Backbone", "MMFLNet", "Prediction", "TrainOutput", "build_model"]
