"""mmfl: cross-domain (consumer-to-shop) fashion retrieval with MMFL-Net.

The public API is imported lazily so that ``import mmfl`` (and ``mmfl --help``) stays fast and
never requires torch or faiss just to start.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "load_config": ("mmfl.config", "load_config"),
    "Config": ("mmfl.config", "Config"),
    "build_model": ("mmfl.models", "build_model"),
    "load_model": ("mmfl.checkpoint", "load_model"),
    "read_dataset": ("mmfl.data.formats", "read_dataset"),
    "Catalog": ("mmfl.catalog", "Catalog"),
    "Retriever": ("mmfl.retriever", "Retriever"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mmfl' has no attribute {name!r}")
