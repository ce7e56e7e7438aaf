"""MMFL-Net and its parts: torchvision backbones, pretrained loading, fusion neck, branches, heads."""
from mmfl.models.backbones import BACKBONES, Backbone
from mmfl.models.mmfl_net import MMFLNet, Prediction, TrainOutput, build_model

__all__ = ["BACKBONES", "Backbone", "MMFLNet", "Prediction", "TrainOutput", "build_model"]
