"""Procedurally generated consumer-to-shop data in the DeepFashion Consumer-to-shop layout.

``generate(out, items, seed, size, workers)`` draws garments (recipe -> garment -> shop and
consumer views) and writes images plus annotation files that the ``deepfashion-c2s`` reader
loads like the real dataset.
"""
from __future__ import annotations

from mmfl.synth.generator import generate

__all__ = ["generate"]
