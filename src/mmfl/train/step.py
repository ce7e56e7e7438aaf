"""One optimisation step of MMFL-Net: the exact code ``mmfl train`` runs, also timed by ``bench/gpu_bench.py``.

The step never waits for the GPU: it returns the loss terms as device tensors and the caller
reads them later (the trainer one step late), so the host can queue the next batch's kernels
while the current ones run. With ``compile_mode`` the forward pass *and* the loss are compiled
together (one graph: the branch pooling, BNNecks, distance matrices and classifiers fuse with
the backbone's tail), while the optimizers stay eager (fused AdamW is already a few kernels).
With ``cuda_graph`` the whole step, optimizers included, is recorded once and replayed
(:mod:`mmfl.train.cuda_graph`): the host then issues one launch per step instead of ~1,500.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mmfl.config import GRAPH_COMPILE_MODES
from mmfl.data.transforms import to_float_images
from mmfl.train.cuda_graph import CapturedStep
from mmfl.train.distributed import DistInfo, average_gradients

#: ``torch.compile`` modes the trainer accepts (``train.compile_mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Batch:
    """One P x K batch: built on the host by the loader, moved with :meth:`to`."""

    images: Tensor
    labels: Tensor
    domains: Tensor  # 0 = consumer, 1 = shop
    attributes: Tensor | None = None
    categories: Tensor | None = None

    def to(self, device: torch.device, channels_last: bool = False) -> Batch:
        """The batch on ``device`` (non-blocking from pinned memory); uint8 images become float in [0, 1] there."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        images = to_float_images(self.images.to(device, non_blocking=True), channels_last)
        return Batch(images, move(self.labels), move(self.domains), move(self.attributes), move(self.categories))


class TrainStep:
    """``step(batch) -> loss terms``: forward under bf16 autocast, multi-task loss, backward, clip, update.

    ``forward_module`` is what runs the forward pass (the model, or its DDP wrapper); the
    gradient clip and the optimizers act on ``model``'s parameters. The center-loss centers
    live outside DDP, so their gradient is all-reduced here before their own SGD step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        criterion: Any,
        optimizer: torch.optim.Optimizer,
        center_optimizer: torch.optim.Optimizer | None,
        *,
        device: torch.device,
        amp: bool,
        grad_clip: float,
        forward_module: torch.nn.Module | None = None,
        compile_mode: str | None = None,
        dist_info: DistInfo | None = None,
        cuda_graph: bool = False,
    ):
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"TrainStep: unknown compile mode {compile_mode!r} (choose from {', '.join(COMPILE_MODES)})")
        if cuda_graph and compile_mode in GRAPH_COMPILE_MODES:
            raise ValueError(f"TrainStep: compile mode {compile_mode!r} makes CUDA graphs itself; "
                             "use 'default' or 'max-autotune-no-cudagraphs' with cuda_graph")
        if cuda_graph and dist_info is not None and dist_info.enabled:
            raise ValueError("TrainStep: a whole-step CUDA graph runs in one process (DDP's all-reduce is not captured)")
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.center_optimizer = center_optimizer
        self.grad_clip = grad_clip
        self.dist_info = dist_info
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._centers = criterion.center_parameters()
        forward = forward_module if forward_module is not None else model
        use_amp = amp and device.type == "cuda"

        def forward_loss(images: Tensor, labels: Tensor, domains: Tensor, attributes: Tensor | None,
                         categories: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
            # a CUDA graph replays the casts it recorded: autocast's weight cache must stay off
            if use_amp:
                with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cuda_graph):
                    output = forward(images)
            else:  # no autocast context at all: devices without autocast (meta) run the step too
                output = forward(images)
            return criterion(output, labels, attributes, categories, domains)

        self._forward_loss: Callable[..., tuple[Tensor, dict[str, Tensor]]] = (
            torch.compile(forward_loss, mode=compile_mode) if compile_mode else forward_loss
        )
        # CUDA-graph modes replay into static buffers: the next replay overwrites this step's
        # outputs, so the terms the caller reads a step later must be copies.
        self._cudagraphs = compile_mode in GRAPH_COMPILE_MODES and device.type == "cuda"
        self.graph: CapturedStep | None = None
        if cuda_graph:
            fixed = [center_optimizer] if center_optimizer is not None else []
            self.graph = CapturedStep(self._update, device, scheduled=[optimizer], fixed=fixed)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """One update; returns the unweighted loss terms and ``total`` as detached device tensors."""
        inputs = (batch.images, batch.labels, batch.domains, batch.attributes, batch.categories)
        return self.graph(*inputs) if self.graph is not None else self._update(*inputs)

    def _update(self, images: Tensor, labels: Tensor, domains: Tensor, attributes: Tensor | None,
                categories: Tensor | None) -> dict[str, Tensor]:
        terms = self.forward_backward(images, labels, domains, attributes, categories)
        if self.grad_clip > 0:
            # foreach norm + in-place scale: no host sync (the clip coefficient stays on the device)
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
        self.optimizer.step()
        if self.center_optimizer is not None:
            if self.dist_info is not None:
                average_gradients(self._centers, self.dist_info)
            self.criterion.rescale_center_grads()
            self.center_optimizer.step()
        return terms

    def forward_backward(self, images: Tensor, labels: Tensor, domains: Tensor, attributes: Tensor | None,
                         categories: Tensor | None) -> dict[str, Tensor]:
        """Our part of the step: forward, multi-task loss, gradients; the rest is PyTorch's clip and optimizers.

        Split out so that :func:`mmfl.train.cuda_graph.capture_hazard` can run exactly this
        code on the ``meta`` device (where the foreach clip and fused AdamW do not exist).
        """
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        total, terms = self._forward_loss(images, labels, domains, attributes, categories)
        if self._cudagraphs:
            terms = {k: v.clone() for k, v in terms.items()}
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        total.backward()
        return terms
