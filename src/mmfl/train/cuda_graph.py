"""The whole optimisation step replayed as ONE CUDA graph: no per-kernel launch cost on the host.

The eager MMFL-Net step launches about 1,500 kernels (backbone, neck, 11 heads, loss, backward,
optimizer); on an H100 the GPU finished its work in 56 of the 82 ms the step took, waiting on
the host for the rest (``docs/BENCHMARKS.md``). A CUDA graph records those launches once and
replays them with one call, so the step costs what its kernels cost. Unlike
``torch.compile(mode="reduce-overhead")`` it needs no compilation (seconds instead of minutes)
and covers the backward pass and the optimizers too.

What a replay needs, and how :class:`CapturedStep` provides it:

* Fixed addresses: every batch is copied into static input tensors (a P x K batch always has the
  same shape); gradients, optimizer states and the returned loss terms live in the graph's
  memory pool. The terms are cloned after each replay because the next replay overwrites them.
* No host synchronisation inside the step: the loss, gradient clipping and fused AdamW already
  keep everything on the device (``mmfl.train.step``); autocast must run without its weight
  cache (PyTorch's CUDA-graph notes).
* A learning rate the schedule can change: a float would be frozen into the graph, so during
  capture each scheduled optimizer's ``lr`` is a one-element device tensor (fused AdamW reads it
  from memory, ``capturable=True``), refilled from the float ``lr`` the scheduler set before
  every replay. Optimizers whose lr is frozen in the graph (the center loss's SGD) are checked
  before every replay instead: a change raises rather than being silently ignored.
* Warm-up: the first ``warmup`` calls run eagerly on a side stream (cuDNN picks its algorithms,
  optimizer states are created), then the next call captures and replays. Every call is a real
  training step; none is spent on a dummy batch.
A batch whose shapes or dtypes differ from the captured ones runs eagerly (logged once); so does
every step after a capture that failed (logged, with the reason in :attr:`CapturedStep.failed`).

Whether a step can be captured at all is checked without a GPU by :func:`capture_hazard`: it
runs the step on the ``meta`` device, which, like a capturing GPU stream, has no data the host
could read.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

Update = Callable[..., dict[str, Tensor]]


def _signature(tensors: Sequence[Tensor | None]) -> tuple:
    """What must match for a batch to replay the captured graph: shape, dtype, layout of each input."""
    return tuple(
        None if t is None else (tuple(t.shape), t.dtype, t.device, t.is_contiguous(memory_format=torch.channels_last))
        for t in tensors
    )


class CapturedStep:
    """``step(*inputs) -> loss terms``: calls ``update(*inputs)`` eagerly ``warmup`` times, then replays it as a graph.

    ``update`` is the whole step (zero_grad, forward, loss, backward, clip, optimizer steps)
    and returns device tensors. ``scheduled`` are the optimizers whose learning rate changes
    between steps: fused Adam/AdamW, switched to ``capturable`` at capture. ``fixed`` are optimizers
    whose learning rate stays constant (it is frozen into the graph).
    """

    def __init__(
        self,
        update: Update,
        device: torch.device,
        scheduled: Sequence[torch.optim.Optimizer],
        fixed: Sequence[torch.optim.Optimizer] = (),
        warmup: int = 3,
    ):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError(f"CapturedStep: warmup must be at least 1 (optimizer states must exist), got {warmup}")
        for opt in scheduled:
            if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) or not all(g.get("fused") for g in opt.param_groups):
                raise ValueError(f"CUDA graphs need fused Adam/AdamW for a scheduled learning rate, got {type(opt).__name__}")
        self.update = update
        self.device = device
        self.scheduled = list(scheduled)
        self.fixed = list(fixed)
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: list[Tensor | None] = []
        self._signature: tuple = ()
        self._terms: dict[str, Tensor] = {}
        self._lrs: list[Tensor] = []
        self._fixed_lrs: list[float] = []
        self._warned = False
        self.failed: str | None = None  # why capture failed, when it did (the step then stays eager)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: Tensor | None) -> dict[str, Tensor]:
        self.calls += 1
        if self.failed is not None:
            return self.update(*inputs)
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(inputs)
        if self.graph is None:
            try:
                self._capture(inputs)
            except RuntimeError as exc:  # an operation that cannot be captured: train on, eagerly, and say so
                self.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("CUDA graph capture failed, the step runs eagerly from now on: %s", self.failed)
                return self.update(*inputs)  # capturing ran nothing: this batch still gets its step
        elif _signature(inputs) != self._signature:
            if not self._warned:
                log.warning("a batch of another shape than the captured one runs eagerly: %s vs %s",
                            _signature(inputs), self._signature)
                self._warned = True
            return self.update(*inputs)
        else:
            for static, t in zip(self._static, inputs):
                if static is not None:
                    static.copy_(t, non_blocking=True)
        self._check_fixed_lrs()
        for lr, group in zip(self._lrs, (g for opt in self.scheduled for g in opt.param_groups)):
            lr.fill_(float(group["lr"]))
        self.graph.replay()
        return {k: v.clone() for k, v in self._terms.items()}

    def _eager_on_side_stream(self, inputs: Sequence[Tensor | None]) -> dict[str, Tensor]:
        """PyTorch's recipe: warm-up iterations on a side stream, so capture starts from a clean stream state."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            terms = self.update(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return terms

    def _capture(self, inputs: Sequence[Tensor | None]) -> None:
        self._static = [None if t is None else t.clone() for t in inputs]  # clone keeps channels_last
        self._signature = _signature(inputs)
        groups = [g for opt in self.scheduled for g in opt.param_groups]
        floats = [g["lr"] for g in groups]
        self._lrs = [torch.tensor(float(lr), dtype=torch.float32, device=self.device) for lr in floats]
        self._fixed_lrs = [float(g["lr"]) for opt in self.fixed for g in opt.param_groups]
        graph = torch.cuda.CUDAGraph()
        for group, lr in zip(groups, self._lrs):
            group["lr"] = lr
            group["capturable"] = True  # from now on: set at capture so the eager warm-up does not warn
        try:
            # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile,
            # which the default ("global") mode would turn into an error in that thread
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._terms = self.update(*self._static)
        finally:  # the optimizers keep float lrs for the scheduler, logging and checkpoints
            for group, lr in zip(groups, floats):
                group["lr"] = lr
        self.graph = graph
        log.info("captured the training step as a CUDA graph after %d eager warm-up steps", self.warmup)

    def _check_fixed_lrs(self) -> None:
        now = [float(g["lr"]) for opt in self.fixed for g in opt.param_groups]
        if now != self._fixed_lrs:
            raise RuntimeError(f"a learning rate frozen into the CUDA graph changed ({self._fixed_lrs} -> {now}); "
                               "pass that optimizer as scheduled")


class _HostDataCopy(RuntimeError):
    """Host memory copied to the device inside the step (a synchronous copy from pageable memory)."""


class _RefuseHostToDevice(TorchDispatchMode):
    """Raises on a copy from CPU memory to another device: the one hazard ``meta`` itself lets pass."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
            source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            target = args[0].device if func.overloadpacket is torch.ops.aten.copy_ else kwargs.get("device")
            if isinstance(source, Tensor) and source.device.type == "cpu" and target is not None \
                    and torch.device(target).type != "cpu":
                raise _HostDataCopy(f"copies a host tensor of shape {tuple(source.shape)} to the device")
        return func(*args, **kwargs)


def capture_hazard(run: Callable[[], object], source_root: Path | None = None) -> str | None:
    """Where ``run`` would break a CUDA graph capture, or None; ``run``'s tensors must be on ``meta``.

    A captured step may not read device data on the host (``.item()``, ``float(t)``, ``if t:``,
    ``.tolist()``, ``.cpu()``), size an output from data (``nonzero``, boolean-mask indexing,
    ``unique``, ``repeat_interleave`` without ``output_size``) or copy host tensors to the device
    (``torch.tensor(...).to(device)``). Meta tensors have no data, so each of these raises there;
    the copy is caught by a dispatch mode. The answer names the innermost frame under
    ``source_root`` (default: the mmfl package) and the error, e.g.
    ``losses/triplet.py:71 (valid.sum().item()): Tensor.item() cannot be called on meta tensors``.
    Not seen: ``torch.tensor(data, device=...)`` built directly on the device (no operator runs).
    """
    root = (source_root or Path(__file__).resolve().parents[1]).resolve()
    try:
        with _RefuseHostToDevice():
            run()
    except (RuntimeError, NotImplementedError) as exc:
        here = Path(__file__).resolve()  # the dispatch mode's own frame is not the culprit
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if Path(f.filename).resolve().is_relative_to(root) and Path(f.filename).resolve() != here]
        where = f"{Path(frames[-1].filename).resolve().relative_to(root)}:{frames[-1].lineno} ({frames[-1].line})" \
            if frames else "outside " + str(root)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{where}: {message}"
    return None
