"""ONNX export of a trained model (parity-checked against PyTorch) and an ONNX Runtime embedder.

The exported graph takes what the model takes: float images in [0, 1], NCHW, with a dynamic batch
axis and a fixed square size; the model's own pixel normalisation is inside the graph. Outputs are
``embedding`` (L2-normalised) and, when the model has those heads, ``attribute_logits`` and
``category_logits``. A model with a box head also gets a box graph (:func:`export_box_onnx`).

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


#: The box graph of a model with a box head (mmfl.models.box_head), written beside the embedding graph.
BOX_OUTPUT_NAMES = ("boxes", "scores", "categories", "category_scores")
BOX_META_FORMAT = "mmfl-onnx-boxes"


def box_graph_path(path: str | Path) -> Path:
    """Where the box graph of embedding graph ``path`` goes: ``model.onnx`` -> ``model.boxes.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.boxes{path.suffix or '.onnx'}")


class _DetectGraph(nn.Module):
    """``model.detect`` as a tuple of tensors, ``max_boxes`` fixed in the graph."""

    def __init__(self, model: nn.Module, max_boxes: int) -> None:
        super().__init__()
        self.model, self.max_boxes = model, max_boxes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.detect(images, self.max_boxes))


def export_box_onnx(model: nn.Module, path: str | Path, size: int, max_boxes: int, opset: int = 17) -> dict[str, Any]:
    """Export ``model.detect`` (whole photos at ``size`` x ``size`` -> top ``max_boxes`` boxes in input
    pixels, scores, categories, category probabilities; decoding included) and check parity.

    Parity on random images at batch 1 and 3, over the boxes that are peaks (score > 0; the rest are
    padding that every reader drops): boxes relative to ``size``, scores and category probabilities
    as they are, categories must agree. Above ``PARITY_TOLERANCE`` an MMFLError; ``path`` untouched.
    """
    import onnx

    if getattr(model, "box_head", None) is None:
        raise MMFLError("export: the model has no box head (train with model.box_head=true)")
    if size < MIN_SIZE:
        raise MMFLError(f"box size: {size} is too small (use {MIN_SIZE} or more)")
    path = Path(path)
    model = copy.deepcopy(model).cpu().float().eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = copy.deepcopy(getattr(model, "meta", {}) or {})
    info = {"format": BOX_META_FORMAT, "version": 1, "size": size, "max_boxes": max_boxes,
            "outputs": list(BOX_OUTPUT_NAMES), "config": meta.get("config") or {},
            "box_category_names": list(meta.get("box_category_names") or []),
            "checkpoint_sha256": meta.get("checkpoint_sha256", ""), "checkpoint": meta.get("checkpoint", "")}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _DetectGraph(model, max_boxes).eval(), (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(BOX_OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *BOX_OUTPUT_NAMES]},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {META_KEY: json.dumps(info)})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        report = check_box_parity(model, tmp, size, max_boxes)
        report.update(path=str(path), size=size, opset=opset, outputs=list(BOX_OUTPUT_NAMES),
                      bytes=tmp.stat().st_size)
        worst = max(report["checked"].values())
        if worst > PARITY_TOLERANCE:
            raise MMFLError(f"{path}: ONNX Runtime boxes differ from PyTorch by {worst:.2e} (> {PARITY_TOLERANCE:g}); "
                            f"per output: {report['checked']}; not written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return report


def check_box_parity(model: nn.Module, onnx_path: str | Path, size: int, max_boxes: int) -> dict[str, Any]:
    """Max differences between the ONNX box graph and ``model.detect`` (see :func:`export_box_onnx`)."""
    detector = OnnxBoxDetector(onnx_path)
    checked: dict[str, float] = {}
    gen = torch.Generator().manual_seed(1)
    for batch in PARITY_BATCHES:
        x = torch.rand(batch, 3, size, size, generator=gen)
        with torch.inference_mode():
            ref = model.detect(x, max_boxes)
        got = detector.detect(x, max_boxes)
        peaks = ref.scores > 0
        diffs = {
            "boxes": (ref.boxes - got.boxes).abs().amax(dim=2)[peaks] / size,
            "scores": (ref.scores - got.scores).abs()[peaks],
            "categories": (ref.categories != got.categories)[peaks].float(),
            "category_scores": (ref.category_scores - got.category_scores).abs()[peaks],
        }
        for name, d in diffs.items():
            checked[name] = max(checked.get(name, 0.0), float(d.max()) if d.numel() else 0.0)
    return {"checked": checked, "batches": list(PARITY_BATCHES), "tolerance": PARITY_TOLERANCE}


class OnnxBoxDetector:
    """A box graph (:func:`export_box_onnx`) run by ONNX Runtime on CPU, usable where the PyTorch model's
    :meth:`~mmfl.models.MMFLNet.detect` is (``mmfl.localise.detect`` takes either)."""

    box_head = True  # what mmfl.localise.has_box_head looks for

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise MMFLError(f"{self.path}: ONNX file not found")
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
            info = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
        except Exception:  # junk file, no metadata, bad JSON: all the same to the user
            raise MMFLError(f"{self.path}: not a box graph written by 'mmfl export'") from None
        if info.get("format") != BOX_META_FORMAT:
            raise MMFLError(f"{self.path}: not a box graph written by 'mmfl export' (format {info.get('format')!r})")
        self.size, self.max_boxes = int(info["size"]), int(info["max_boxes"])
        self.meta = {"config": info["config"], "box_category_names": info["box_category_names"],
                     "checkpoint_sha256": info["checkpoint_sha256"], "checkpoint": info["checkpoint"],
                     "onnx": str(self.path)}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def detect(self, x: np.ndarray | torch.Tensor, max_boxes: int | None = None) -> Any:
        """(N, 3, size, size) float photos in [0, 1] -> BoxDetections of CPU tensors, at most the graph's k."""
        from mmfl.models.box_head import BoxDetections

        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[2:] != (self.size, self.size):
            raise MMFLError(f"{self.path}: expects photos of shape (N, 3, {self.size}, {self.size}), got {arr.shape}")
        k = self.max_boxes if max_boxes is None else min(max_boxes, self.max_boxes)
        values = self.session.run(list(BOX_OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(arr)})
        return BoxDetections(*(torch.from_numpy(v)[:, :k] for v in values))
