"""ONNX export of a trained model (parity-checked against PyTorch) and an ONNX Runtime embedder.

The exported graph takes what the model takes: float images in [0, 1], NCHW, with a dynamic batch
axis and a fixed square size; the model's own pixel normalisation is inside the graph. Outputs are
``embedding`` (L2-normalised) and, when the model has those heads, ``attribute_logits`` and
``category_logits``.

Why custom pooling symbolics: the TorchScript exporter writes adaptive pooling only when each
output size divides the input size (one ONNX pool with a uniform window) and the input's size is
known to its shape inference; otherwise it refuses (``adaptive_max_pool2d ... output size that are
not factor of input size`` / ``input size not accessible``). A 3-stripe split of a 16- or 20-row
map has unequal windows (rows 0-6, 5-11, 10-16 of 16), and after a size-from-shape upsampling the
exporter no longer knows spatial sizes. During an export we therefore write each adaptive window
as a Slice (bounds computed from the tensor's shape in the graph) and a ReduceMax/ReduceMean:
exactly PyTorch's windows, for any size. The torch.export-based exporter is not used because it
needs ``onnxscript``, which is not a dependency.

:class:`OnnxEmbedder` mirrors the parts of the PyTorch model that indexing and serving use
(``predict``, ``meta``, ``embed_dim``), so a server can swap one for the other.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfl.errors import MMFLError

INPUT_NAME = "images"
OUTPUT_NAMES = ("embedding", "attribute_logits", "category_logits")
PARITY_TOLERANCE = 1e-3
PARITY_BATCHES = (1, 3)
META_KEY = "mmfl"
META_FORMAT = "mmfl-onnx"
#: Smallest input side the backbones accept (as ``input.size`` requires in training).
MIN_SIZE = 32


class _PredictGraph(nn.Module):
    """``model.predict`` as a tuple of tensors (ONNX outputs cannot be a dataclass or hold None)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.model.predict(images)
        return tuple(t for t in (p.embedding, p.attribute_logits, p.category_logits) if t is not None)


def _adaptive_pool_symbolic(reduce_op: str, with_indices: bool, opset: int) -> Any:
    """A TorchScript-exporter symbolic for adaptive pooling with any output size (see module doc).

    Window ``i`` of ``n_out`` over a length ``L`` is ``[floor(i*L/n_out), ceil((i+1)*L/n_out))``,
    PyTorch's definition. ``L`` is read from the tensor's shape inside the graph, because the
    exporter's shape inference loses the spatial sizes after a size-from-shape ``interpolate``.
    """

    def symbolic(g: Any, x: Any, output_size: Any) -> Any:
        from torch.onnx import symbolic_helper

        def const(value: int) -> Any:
            return g.op("Constant", value_t=torch.tensor([value], dtype=torch.int64))

        y = x
        for axis, n_out in zip((2, 3), symbolic_helper._parse_arg(output_size, "is")):
            length = g.op("Slice", g.op("Shape", y), const(axis), const(axis + 1))  # 1-D [L]
            parts = []
            for i in range(n_out):
                start = g.op("Div", g.op("Mul", length, const(i)), const(n_out))
                end = g.op("Div", g.op("Add", g.op("Mul", length, const(i + 1)), const(n_out - 1)), const(n_out))
                window = g.op("Slice", y, start, end, const(axis))
                if opset >= 18:  # opset 18 moved the reduced axes from an attribute to an input
                    parts.append(g.op(reduce_op, window, const(axis), keepdims_i=1))
                else:
                    parts.append(g.op(reduce_op, window, axes_i=[axis], keepdims_i=1))
            y = parts[0] if n_out == 1 else g.op("Concat", *parts, axis_i=axis)
        return (y, None) if with_indices else y

    return symbolic


@contextlib.contextmanager
def _adaptive_pooling_symbolics(opset: int) -> Iterator[None]:
    """Register the adaptive-pooling symbolics for the duration of one export."""
    ops = {"aten::adaptive_max_pool2d": ("ReduceMax", True), "aten::adaptive_avg_pool2d": ("ReduceMean", False)}
    for name, (reduce_op, with_indices) in ops.items():
        torch.onnx.register_custom_op_symbolic(name, _adaptive_pool_symbolic(reduce_op, with_indices, opset), opset)
    try:
        yield
    finally:
        for name in ops:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _export_meta(model: nn.Module, size: int, output_names: list[str]) -> dict[str, Any]:
    """What a server needs to use the graph in place of the checkpoint (see :class:`OnnxEmbedder`)."""
    meta = copy.deepcopy(getattr(model, "meta", {}) or {})
    config = meta.get("config") or {}
    config.setdefault("input", {})["size"] = size  # the graph's fixed size is the size to feed it
    return {
        "format": META_FORMAT,
        "version": 1,
        "size": size,
        "embed_dim": int(model.embed_dim),
        "outputs": output_names,
        "config": config,
        "num_items": meta.get("num_items", getattr(model, "num_items", 0)),
        "attribute_names": list(meta.get("attribute_names", [])),
        "category_names": list(meta.get("category_names", [])),
        "attribute_thresholds": meta.get("attribute_thresholds"),
        "attribute_calibration": meta.get("attribute_calibration"),
        "attribute_groups": dict(meta.get("attribute_groups") or {}),
        "checkpoint_sha256": meta.get("checkpoint_sha256", ""),
        "checkpoint": meta.get("checkpoint", ""),
    }


def export_onnx(model: nn.Module, path: str | Path, size: int, opset: int = 17) -> dict[str, Any]:
    """Export ``model.predict`` to ONNX at ``size`` x ``size``, check parity, then move it into place.

    Parity: ONNX Runtime and PyTorch on the same random images at batch 1 and 3 (so the dynamic
    batch axis is exercised). The embedding is compared as is (unit vectors); logits relative to
    their largest magnitude (when above 1), since an untrained head's logits can be large. Above
    ``PARITY_TOLERANCE`` an MMFLError is raised and ``path`` is left untouched. Returns the parity
    report: ``{"path", "size", "opset", "outputs", "max_abs_diff": {output: diff}, "checked": {...},
    "batches", "tolerance", "bytes"}``.
    """
    import onnx

    if size < MIN_SIZE:
        raise MMFLError(f"--size: {size} is too small (use {MIN_SIZE} or more)")
    if not hasattr(model, "predict") or not hasattr(model, "embed_dim"):
        raise MMFLError("export: the model has no predict()/embed_dim (is it an MMFL-Net?)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    graph = _PredictGraph(model).eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        output_names = [name for name, t in zip(OUTPUT_NAMES, _fields(model.predict(example))) if t is not None]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with _adaptive_pooling_symbolics(opset), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                graph, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=output_names,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {META_KEY: json.dumps(_export_meta(model, size, output_names))})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        report = check_parity(model, tmp, size)
        report.update(path=str(path), size=size, opset=opset, outputs=output_names, bytes=tmp.stat().st_size)
        worst = max(report["checked"].values())
        if worst > PARITY_TOLERANCE:
            raise MMFLError(
                f"{path}: ONNX Runtime differs from PyTorch by {worst:.2e} (> {PARITY_TOLERANCE:g}); "
                f"per output: {report['checked']}; not written"
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return report


def check_parity(model: nn.Module, onnx_path: str | Path, size: int) -> dict[str, Any]:
    """Max differences between ONNX Runtime and PyTorch outputs on random images (see :func:`export_onnx`)."""
    embedder = OnnxEmbedder(onnx_path)
    raw: dict[str, float] = {}
    checked: dict[str, float] = {}
    gen = torch.Generator().manual_seed(1)
    for batch in PARITY_BATCHES:
        x = torch.rand(batch, 3, size, size, generator=gen)
        with torch.inference_mode():
            ref = model.predict(x)
        got = embedder.predict(x)
        for name, a, b in zip(OUTPUT_NAMES, _fields(ref), _fields(got)):
            if a is None and b is None:
                continue
            if a is None or b is None or a.shape != b.shape:
                raise MMFLError(f"{onnx_path}: output '{name}' does not match PyTorch's shape at batch {batch}")
            diff = float((a.float() - b.float()).abs().max())
            scale = 1.0 if name == "embedding" else max(1.0, float(a.abs().max()))
            raw[name] = max(raw.get(name, 0.0), diff)
            checked[name] = max(checked.get(name, 0.0), diff / scale)
    return {"max_abs_diff": raw, "checked": checked, "batches": list(PARITY_BATCHES), "tolerance": PARITY_TOLERANCE}


def _fields(pred: Any) -> tuple[Any, Any, Any]:
    return pred.embedding, pred.attribute_logits, pred.category_logits


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """The mmfl metadata stored in an exported graph; a foreign or unreadable file is an MMFLError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MMFLError(f"{path}: ONNX file not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for junk files
        raise MMFLError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = json.loads(props[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise MMFLError(f"{path}: not exported by 'mmfl export' (no '{META_KEY}' metadata)") from None
    if meta.get("format") != META_FORMAT:
        raise MMFLError(f"{path}: unknown metadata format {meta.get('format')!r}")
    return meta


class OnnxEmbedder:
    """An exported graph run by ONNX Runtime on CPU, usable where the PyTorch model is.

    ``meta`` has the keys of ``load_model(...).meta`` (config with ``input.size`` = the graph's size,
    attribute/category names, and the source checkpoint's path and SHA-256, so an index built with
    that checkpoint accepts it); ``predict`` returns a :class:`mmfl.models.Prediction` of CPU tensors.
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        info = read_onnx_meta(self.path)
        self.size = int(info["size"])
        self.embed_dim = int(info["embed_dim"])
        self.outputs = list(info["outputs"])
        self.meta = {key: info[key] for key in
                     ("config", "num_items", "attribute_names", "category_names", "checkpoint_sha256", "checkpoint")}
        # absent from graphs exported before attributes were calibrated: those decode at 0.5
        self.meta.update({key: info.get(key) for key in ("attribute_thresholds", "attribute_calibration",
                                                          "attribute_groups")})
        self.meta["onnx"] = str(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # no busy-waiting between runs: the same process decodes, resizes (torch) and searches (faiss),
        # and spinning ONNX Runtime threads would take the cores those need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def eval(self) -> OnnxEmbedder:
        """No-op, for code written against an nn.Module."""
        return self

    def predict(self, x: np.ndarray | torch.Tensor) -> Any:
        """(N, 3, size, size) float images in [0, 1] -> Prediction(embedding, attribute_logits, category_logits)."""
        from mmfl.models import Prediction

        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[2:] != (self.size, self.size):
            raise MMFLError(f"{self.path}: expects images of shape (N, 3, {self.size}, {self.size}), got {arr.shape}")
        values = dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(arr)})))
        tensors = {name: torch.from_numpy(v) for name, v in values.items()}
        return Prediction(tensors["embedding"], tensors.get("attribute_logits"), tensors.get("category_logits"))

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The embedding alone, like the PyTorch model in eval mode."""
        return self.predict(x).embedding
