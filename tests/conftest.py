"""Shared test setup: keep torch to the machine's 2 cores and make runs reproducible."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from search_helpers import make_checkpoint, make_gallery

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The small gallery and untrained checkpoint that the index, embedding and API tests share, one
# copy per test module (a module may change its copy, e.g. grow the gallery).
@pytest.fixture(scope="module")
def work(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def gallery(work: Path) -> Path:
    return make_gallery(work / "gallery")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return make_checkpoint(work / "model.pt")
