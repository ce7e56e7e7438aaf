"""Training: the loop, its schedule and its torchrun integration."""
from mmfl.train.trainer import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]
