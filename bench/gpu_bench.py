"""GPU benchmark: MMFL-Net training and extraction against the bare ResNet-50, in one run.

Every figure is a ratio measured in this run: model FLOP utilisation (MFU) is the achieved
TFLOP/s (FLOPs per image from ``torch.utils.flop_counter`` on forward+backward, times images/s)
over the bf16 matmul rate of an 8192^3 GEMM timed here; end-to-end training from JPEG files is
compared with the same step on tensors already on the GPU; extraction with the bare forward.

Measurements (each in try/except: one failure is an ``error`` entry, never a lost run):

* ``train/{mmfl,bare}/eager``: the training step as ``mmfl train`` runs it (the trainer's own
  :class:`mmfl.train.step.TrainStep`: bf16 autocast, channels_last, the multi-task criterion,
  fused AdamW, gradient clipping, the center-loss SGD) vs a bare torchvision classifier
  (cross-entropy, fused AdamW), P x K images.
* ``train/mmfl-frozen-bn/...``: the same MMFL-Net with ``model.backbone_norm=frozen`` (the
  backbone's batch norm as a fixed affine: same FLOPs, no batch statistics); an option whose
  accuracy cost is measured on real photos (``docs/RESULTS.md``), timed here beside the default.
* ``train/{mmfl,bare}/graph`` (CUDA only): the same step replayed as one CUDA graph
  (``train.cuda_graph``, :mod:`mmfl.train.cuda_graph`); ``graph/parity`` first checks that six
  graphed steps (three eager warm-ups, the capture, two replays with a changed learning rate)
  give the eager step's losses and weights from the same initial state.
* ``train/{mmfl,bare}/compile-<mode>[+graph]``: the same with ``torch.compile`` on forward + loss
  (and the whole step graphed), in a child process with a timeout (compilation can take
  minutes; it never blocks the rest). The compiled kernels are saved under
  ``OUT/compile-cache``; ``--compile-cache`` pre-loads such a folder, so a later session
  measures the same configuration without compiling from scratch.
* ``extract/{mmfl,bare}``: eval-mode forward, bf16, channels_last, GPU-resident batch.
* ``loader/jpeg``, ``e2e/mmfl/{resident,jpeg}``: a generated dataset (``mmfl synth``) read by the
  training pipeline (reader, PKSampler, train transforms, DataLoader workers, pinned memory,
  uint8 batches scaled on the GPU) vs the same step on one batch kept on the GPU; on a GPU the
  step is the graphed one (the fastest eager-built step, so the hardest to feed).
* ``loader/jpeg-gpu-decode``, ``e2e/mmfl/jpeg-gpu-decode``: the same with ``data.decode=gpu``
  (:mod:`mmfl.data.gpu_decode`): the workers only read file bytes, and each batch is decoded by
  nvJPEG in one call and augmented on the GPU. The smoke run decodes on its CPU device.
* ``profile/{mmfl,mmfl-frozen-bn}/eager``: the profiler's operator table of a few eager steps
  (``gpu_profile.txt``, ``gpu_profile_mmfl-frozen-bn.txt``) and the GPU kernel time per step.

``--sections`` picks some of them; ``--smoke`` runs everything tiny on CPU (resnet18, 64 px,
2 steps, no compile) so CI exercises the code. Writes ``gpu_bench.json`` and ``gpu_bench.md``
under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REFERENCE = {  # H100, 2026-11-27, issue 8
    "gemm_bf16_tflops": 791.0,
    "bare_resnet50_eager_images_per_s": 1809.0, "bare_resnet50_eager_mfu": 0.113,
    "bare_resnet50_compiled_images_per_s": 1888.0,
}
TARGETS = {"mmfl_train_mfu": 0.25, "e2e_over_resident": 0.9}
SECTIONS = ("train", "extract", "e2e", "profile", "compile")
PARITY_STEPS = 6  # graph/parity: 3 eager warm-ups, the capture + replay, 2 replays (lr changed before the last)
#: Trained models: the mmfl preset as is, the same with its backbone's batch norm frozen
#: (``model.backbone_norm=frozen``: same FLOPs, no batch statistics), and the bare classifier.
MODELS: dict[str, list[str]] = {"mmfl": [], "mmfl-frozen-bn": ["model.backbone_norm=frozen"], "bare": []}
NUM_ITEMS = 5000  # ID classes of the bench model (DeepFashion C2S has ~14k training items; cost is negligible)
NUM_ATTRIBUTES = 303  # DeepFashion's per-item attributes
PREFETCH = 2  # DataLoader prefetch_factor (batches per worker held ready)


@dataclass
class Settings:
    device: torch.device
    smoke: bool
    backbone: str
    size: int
    p: int
    k: int
    warmup: int
    steps: int
    extract_batch: int
    gemm_size: int
    amp: bool
    workers: int
    synth_items: int
    compile_runs: tuple[tuple[str, str], ...]  # (model, torch.compile mode), in order
    num_items: int  # ID classes of the bench model
    deadline: float  # time.monotonic() after which optional sections are skipped

    @property
    def batch(self) -> int:
        return self.p * self.k


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call over ``steps`` calls after ``warmup`` calls, warm-up seconds)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t1) / steps, t1 - t0


# ---------------------------------------------------------------- models and steps


def build_mmfl(s: Settings, num_items: int | None = None, num_attributes: int = NUM_ATTRIBUTES,
               which: str = "mmfl") -> tuple[torch.nn.Module, Any, Any]:
    """MMFL-Net (mmfl preset, with ``which``'s overrides) and its criterion from the project's own builders."""
    from mmfl.config import load_config
    from mmfl.losses import build_criterion
    from mmfl.models import build_model

    cfg = load_config("mmfl", [f"model.backbone={s.backbone}", "model.pretrained=none", f"input.size={s.size}",
                               f"train.batch_items={s.p}", f"train.images_per_item={s.k}", *MODELS[which]])
    num_items = num_items or s.num_items
    model = build_model(cfg, num_items, num_attributes).to(s.device).to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg, num_items, model.global_dim).to(s.device)
    return model, criterion, cfg


def build_bare(s: Settings) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, s.backbone)(weights=None)
    return model.to(s.device).to(memory_format=torch.channels_last)


def pk_labels(s: Settings) -> torch.Tensor:
    return torch.arange(s.p, device=s.device).repeat_interleave(s.k)


def pk_domains(s: Settings) -> torch.Tensor:
    """Per item K-1 consumer photos and one shop photo, as the P x K sampler draws them."""
    return torch.tensor(([0] * (s.k - 1) + [1]) * s.p, device=s.device)


def random_attributes(n: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, 3, (n, NUM_ATTRIBUTES), generator=gen) - 1).to(torch.int8).to(device)


def mmfl_step(model: torch.nn.Module, criterion: Any, cfg: Any, s: Settings,
              compile_mode: str | None = None, cuda_graph: bool = False) -> Any:
    """The trainer's own step (:class:`mmfl.train.step.TrainStep`) with the trainer's optimizers."""
    from mmfl.train.step import TrainStep
    from mmfl.train.trainer import build_optimizer

    centers = criterion.center_parameters()
    center_opt = torch.optim.SGD(centers, lr=cfg.loss.center_lr) if centers else None
    return TrainStep(model, criterion, build_optimizer(cfg, model, s.device), center_opt, device=s.device,
                     amp=s.amp, grad_clip=cfg.train.grad_clip, compile_mode=compile_mode, cuda_graph=cuda_graph)


def bare_step(model: torch.nn.Module, s: Settings, compile_mode: str | None = None,
              cuda_graph: bool = False) -> Callable[[Any], Any]:
    """The reference: a torchvision classifier, cross-entropy, fused AdamW; compiled and graphed like MMFL-Net."""
    from mmfl.train.cuda_graph import CapturedStep
    from mmfl.config import GRAPH_COMPILE_MODES

    optimizer = torch.optim.AdamW(model.parameters(), lr=3.5e-4, fused=s.device.type == "cuda")

    def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp, cache_enabled=not cuda_graph):
            return torch.nn.functional.cross_entropy(model(images), labels)

    run = torch.compile(forward_loss, mode=compile_mode) if compile_mode else forward_loss
    cudagraphs = compile_mode in GRAPH_COMPILE_MODES and s.device.type == "cuda"

    def update(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = run(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"total": loss.detach()}

    graph = CapturedStep(update, s.device, scheduled=[optimizer]) if cuda_graph else None

    def step(batch: Any) -> dict[str, torch.Tensor]:
        return (graph or update)(batch.images, batch.labels)

    step.graph = graph  # type: ignore[attr-defined]  # as TrainStep.graph: did the capture happen?
    return step


def resident_batch(s: Settings, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, s.size, s.size, generator=gen).to(s.device)
    return images.contiguous(memory_format=torch.channels_last)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call (convolutions and matrix products; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def flops_per_image_train(model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor],
                          images: torch.Tensor) -> float:
    """Forward + backward FLOPs per image (no optimizer step: element-wise, not counted anyway)."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            out = model(images)
        loss_fn(out).backward()

    flops = count_flops(run)
    model.zero_grad(set_to_none=True)
    return flops / images.shape[0]


def rate_record(s: Settings, seconds_per_step: float, batch: int, flops_per_image: float | None,
                gemm_tflops: float | None, **extra: Any) -> dict[str, Any]:
    images_per_s = batch / seconds_per_step
    rec: dict[str, Any] = {"images_per_s": images_per_s, "step_ms": seconds_per_step * 1e3, "batch": batch, **extra}
    if flops_per_image:
        tflops = flops_per_image * images_per_s / 1e12
        rec.update(gflops_per_image=flops_per_image / 1e9, achieved_tflops=tflops)
        if gemm_tflops:
            rec["mfu"] = tflops / gemm_tflops
    if s.device.type == "cuda":
        rec["max_memory_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return rec


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- sections


def measure_gemm(s: Settings) -> dict[str, Any]:
    """bf16 (fp32 on CPU) square matmul rate: the MFU denominator."""
    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32
    n = s.gemm_size
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    seconds, _ = timed_loop(lambda: torch.mm(a, b), 3, 3 if s.smoke else 20, s.device)
    return {"dtype": str(dtype).replace("torch.", ""), "size": n, "tflops": 2 * n**3 / seconds / 1e12}


def resident_train_batch(s: Settings, seed: int = 0) -> Any:
    from mmfl.train.step import Batch

    return Batch(resident_batch(s, s.batch, seed), pk_labels(s), pk_domains(s), random_attributes(s.batch, s.device))


def measure_train(s: Settings, which: str, gemm: float | None, compile_mode: str | None = None,
                  cuda_graph: bool = False) -> dict[str, Any]:
    """Images/s of the training step on a GPU-resident P x K batch; FLOPs counted on the eager model."""
    batch = resident_train_batch(s)
    if which != "bare":
        model, criterion, cfg = build_mmfl(s, which=which)
        model.train()
        flops = flops_per_image_train(
            model, lambda out: criterion(out, batch.labels, batch.attributes, None, batch.domains)[0], batch.images)
        step = mmfl_step(model, criterion, cfg, s, compile_mode, cuda_graph)
    else:
        model = build_bare(s).train()
        flops = flops_per_image_train(model, lambda out: torch.nn.functional.cross_entropy(out, batch.labels),
                                      batch.images)
        step = bare_step(model, s, compile_mode, cuda_graph)
    warmup = s.warmup + (3 if compile_mode else 0)
    seconds, warm_s = timed_loop(lambda: step(batch), warmup, s.steps, s.device)
    graph = getattr(step, "graph", None)
    rec = rate_record(s, seconds, s.batch, flops, gemm, warmup_s=warm_s, compile=compile_mode or "eager",
                      cuda_graph=cuda_graph)
    if graph is not None:  # a failed capture times the eager fallback: say so in the row
        rec.update(captured=graph.captured, **({"capture_failed": graph.failed} if graph.failed else {}))
    del model, step
    release(s.device)
    return rec


def graph_parity(s: Settings) -> dict[str, Any]:
    """The graphed MMFL-Net step against the eager one from identical weights, batch by batch.

    Six steps on three different batches; the learning rate changes before the last step (the
    graph must read the scheduler's new value). Reports the largest relative difference of the
    total loss per step and of the weights at the end: bf16 kernels picked independently by
    cuDNN make them close, not bit-equal.
    """
    batches = [resident_train_batch(s, seed) for seed in range(3)]
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model, criterion, cfg = build_mmfl(s)
        model.train()
        step = mmfl_step(model, criterion, cfg, s, cuda_graph=graphed)
        losses = []
        for i in range(PARITY_STEPS):
            if i == PARITY_STEPS - 1:
                for group in step.optimizer.param_groups:
                    group["lr"] *= 0.5
            losses.append(step(batches[i % len(batches)])["total"])
        sync(s.device)
        weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        runs.append((torch.stack(losses).float(), weights, step.graph))
        del model, step
        release(s.device)
    (eager_loss, eager_w, _), (graph_loss, graph_w, graph) = runs
    loss_rel = ((graph_loss - eager_loss).abs() / eager_loss.abs().clamp(min=1e-6)).tolist()
    weight_rel = float((graph_w - eager_w).norm() / eager_w.norm())
    return {"captured": graph.captured, "capture_failed": graph.failed, "steps": PARITY_STEPS,
            "eager_losses": eager_loss.tolist(),
            "graph_losses": graph_loss.tolist(), "loss_rel_diff_per_step": loss_rel,
            "max_loss_rel_diff": max(loss_rel), "weight_rel_diff": weight_rel}


def profile_train(s: Settings, out_dir: Path, which: str = "mmfl") -> dict[str, Any]:
    """Where the eager step spends its GPU time: the top kernels (``gpu_profile[_<which>].txt``) and
    the kernel time per step, the floor a CUDA graph can bring the step down to."""
    from torch.profiler import ProfilerActivity, profile

    batch = resident_train_batch(s)
    model, criterion, cfg = build_mmfl(s, which=which)
    model.train()
    step = mmfl_step(model, criterion, cfg, s)
    for _ in range(s.warmup):
        step(batch)
    sync(s.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    steps = 2 if s.smoke else 5
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        sync(s.device)
    cuda = s.device.type == "cuda"
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    name = "gpu_profile.txt" if which == "mmfl" else f"gpu_profile_{which}.txt"
    (out_dir / name).write_text(f"# {steps} eager {which} training steps, sorted by {key}\n"
                                f"{events.table(sort_by=key, row_limit=30)}\n")
    rec: dict[str, Any] = {"steps": steps, "file": name}
    if cuda:  # self times of all operators and kernels: each kernel counted once
        total_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
        rec["kernel_ms_per_step"] = total_us / 1e3 / steps
    del model, step
    release(s.device)
    return rec


def measure_extract(s: Settings, which: str, gemm: float | None) -> dict[str, Any]:
    """Eval-mode embedding throughput (bf16 autocast, inference mode) on a GPU-resident batch."""
    model = (build_mmfl(s)[0] if which == "mmfl" else build_bare(s)).eval()
    images = resident_batch(s, s.extract_batch)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
            model(images)

    flops = count_flops(run) / s.extract_batch
    seconds, _ = timed_loop(run, s.warmup, s.steps, s.device)
    rec = rate_record(s, seconds, s.extract_batch, flops, gemm)
    del model
    release(s.device)
    return rec


def make_dataset(s: Settings, root: Path) -> Any:
    """Generate a dataset at the training size and read it the way ``mmfl train`` does."""
    from mmfl.config import load_config
    from mmfl.synth import generate
    from mmfl.train.trainer import prepare_data

    t0 = time.perf_counter()
    generate(root, s.synth_items, seed=0, size=s.size, workers=max(1, min(16, os.cpu_count() or 1)))
    log(f"synth: {s.synth_items} items at {s.size} px in {time.perf_counter() - t0:.1f}s")
    cfg = load_config("mmfl", [f"data.root={root}", "data.format=deepfashion-c2s", f"input.size={s.size}",
                               f"model.backbone={s.backbone}", "model.pretrained=none"])
    return prepare_data(cfg), cfg


def jpeg_batches(s: Settings, data: Any, cfg: Any, decode_device: torch.device | None = None) -> Iterator[Any]:
    """Endless batches from the training pipeline, as ``mmfl train`` builds them.

    Without ``decode_device`` (``data.decode=cpu``): pinned host batches, decoded and augmented
    by the workers. With it (``data.decode=gpu``): the workers read file bytes only, and each batch
    is decoded and augmented on ``decode_device`` (:class:`mmfl.data.gpu_decode.DeviceBatches`).
    """
    from torch.utils.data import DataLoader

    from mmfl.data.gpu_decode import DeviceBatches, TrainAugment, collate_encoded
    from mmfl.data.sampler import PKSampler
    from mmfl.train.step import Batch
    from mmfl.train.trainer import train_dataset

    inp = cfg.input
    dataset = train_dataset(cfg, data, decode_device)
    sampler = PKSampler([r.item_id for r in data.records], [r.domain for r in data.records], s.p, s.k, seed=0)
    extra = {"persistent_workers": True, "prefetch_factor": PREFETCH} if s.workers else {}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=s.workers,
                        pin_memory=s.device.type == "cuda" and decode_device is None,
                        collate_fn=None if decode_device is None else collate_encoded, **extra)
    augment = TrainAugment(s.size, inp.flip, inp.crop_scale_min, inp.color_jitter, inp.random_erasing)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        batches = loader if decode_device is None else DeviceBatches(loader, decode_device, augment, seed=epoch)
        for images, labels, index in batches:
            attrs = data.attributes[labels] if data.attributes.shape[1] else None
            yield Batch(images, labels, data.record_domains[index], attrs)
        epoch += 1


#: The input pipelines fed to the step: (row suffix, whether JPEGs are decoded on the training device).
PIPELINES = (("jpeg", False), ("jpeg-gpu-decode", True))


def measure_e2e(s: Settings) -> dict[str, Any]:
    """Per input pipeline (CPU workers decode; ``data.decode=gpu``): the loader alone and the step fed
    by it, as a ratio to the same step on one batch kept on the device.

    The GPU-decode pipeline decodes on ``s.device``: on the smoke run's CPU that exercises the
    code (torchvision decodes lists on the CPU too), its rates mean nothing. A pipeline that fails
    is an ``error`` row; the other is still measured.
    """
    from mmfl.data.gpu_decode import device_decode_problem

    root = Path(tempfile.mkdtemp(prefix="mmfl-gpu-bench-")) / "synth"
    try:
        data, cfg = make_dataset(s, root)
        model, criterion, mcfg = build_mmfl(s, data.num_items, int(data.attributes.shape[1]))
        model.train()
        graphed = s.device.type == "cuda"
        step = mmfl_step(model, criterion, mcfg, s, cuda_graph=graphed)
        out: dict[str, Any] = {}
        resident_s: float | None = None
        for name, on_device in PIPELINES:
            problem = device_decode_problem(s.device) if on_device and s.device.type == "cuda" else None
            if problem is not None:
                out[f"e2e/mmfl/{name}"] = {"error": problem}
                continue
            try:
                rows, resident_s = _pipeline_rows(s, data, cfg, step, name, s.device if on_device else None, resident_s)
            except Exception as exc:  # one pipeline failing must not lose the other's rows
                traceback.print_exc()
                reason = str(exc).splitlines()[0] if str(exc) else ""
                out[f"e2e/mmfl/{name}"] = {"error": f"{type(exc).__name__}: {reason}"}
                continue
            out.update(rows)
        resident = {} if resident_s is None else {
            "e2e/mmfl/resident": rate_record(s, resident_s, s.batch, None, None, cuda_graph=graphed)}
        del model, step
        release(s.device)
        return {**resident, **out}
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def _pipeline_rows(s: Settings, data: Any, cfg: Any, step: Any, name: str, decode_device: torch.device | None,
                   resident_s: float | None) -> tuple[dict[str, Any], float]:
    """``loader/<name>`` and ``e2e/mmfl/<name>`` for one pipeline; times the resident step first if not yet done."""
    batches = jpeg_batches(s, data, cfg, decode_device)
    queued = max(1, s.workers * PREFETCH)  # batches the loader holds ready: drained before each timing

    def drain() -> None:
        for _ in range(queued):
            next(batches)

    where = {"decode_device": str(decode_device)} if decode_device is not None else {}
    loader_s, _ = timed_loop(lambda: next(batches), queued, s.steps, s.device)
    rows: dict[str, Any] = {f"loader/{name}": {"images_per_s": s.batch / loader_s, "workers": s.workers,
                                               "train_images": len(data.records), "items": data.num_items, **where}}
    if resident_s is None:
        resident = next(batches).to(s.device, channels_last=True)
        resident_s, _ = timed_loop(lambda: step(resident), s.warmup, s.steps, s.device)
    drain()  # the queue filled up while the step ran
    fed_s, _ = timed_loop(lambda: step(next(batches).to(s.device, channels_last=True)), s.warmup, s.steps, s.device)
    rows[f"e2e/mmfl/{name}"] = rate_record(s, fed_s, s.batch, None, None, ratio_vs_resident=resident_s / fed_s,
                                           workers=s.workers, cuda_graph=s.device.type == "cuda", **where)
    del batches
    return rows, resident_s


def cache_file(folder: Path, which: str, mode: str) -> Path:
    """Where one compiled measurement's artifacts live: per model, mode, torch version and device."""
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    return folder / f"{which}-{mode}-torch{torch.__version__}-{device}.bin"


def load_compile_cache(path: Path) -> dict[str, Any]:
    """Pre-load compiled kernels saved by an earlier run (``torch.compiler`` mega-cache); a stale file is reported, not fatal."""
    if not path.is_file():
        return {"loaded": False}
    try:  # torch logs and returns None for a file it cannot read (checksum), raises for others
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # another torch build, a torn file: compile cold
        return {"loaded": False, "load_error": f"{type(exc).__name__}: {exc}"[:200]}
    if info is None:
        return {"loaded": False, "load_error": f"{path.name}: not a readable compile cache (compiling cold)"}
    return {"loaded": True, "loaded_bytes": path.stat().st_size}


def save_compile_cache(path: Path) -> dict[str, Any]:
    """Write this process's compiled artifacts so the next session's compile starts warm."""
    from mmfl.atomic import atomic_write

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return {"saved_bytes": 0}
    atomic_write(path, lambda fh: fh.write(saved[0]))
    return {"saved_bytes": len(saved[0]), "saved_to": str(path)}


def run_child(s: Settings, which: str, mode: str, gemm: float | None, timeout_s: float, smoke: bool,
              cache_dirs: tuple[Path | None, Path]) -> dict[str, Any]:
    """A compiled-training measurement in its own process, killed after ``timeout_s``.

    ``cache_dirs``: (folder to pre-load compiled artifacts from, or None; folder to save them to).
    """
    load_from, save_to = cache_dirs
    with tempfile.TemporaryDirectory(prefix="mmfl-gpu-bench-child-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, mode, str(result),
               "--gemm-tflops", str(gemm or 0), "--save-compile-cache", str(save_to)]
        cmd += (["--compile-cache", str(load_from)] if load_from else []) + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f}s (compile time-box)"}
        if proc.returncode != 0 or not result.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
        return json.loads(result.read_text())


# ---------------------------------------------------------------- driver


def split_mode(mode: str) -> tuple[str, bool]:
    """``"default+graph"`` -> ("default", True): a compile mode, and whether the whole step is graphed."""
    base, plus, rest = mode.partition("+")
    return base, bool(plus) and rest == "graph"


def parse_compile_runs(text: str) -> tuple[tuple[str, str], ...]:
    """``"mmfl:default,bare:default+graph"`` -> (("mmfl", "default"), ("bare", "default+graph"))."""
    from mmfl.config import GRAPH_COMPILE_MODES
    from mmfl.train.step import COMPILE_MODES

    allowed = [*COMPILE_MODES, *(f"{m}+graph" for m in COMPILE_MODES if m not in GRAPH_COMPILE_MODES)]
    runs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        which, _, mode = item.partition(":")
        if which not in MODELS or mode not in allowed:
            raise SystemExit(f"--compile-runs: '{item}' is not MODEL:MODE with MODEL {'|'.join(MODELS)} and MODE one of "
                             f"{', '.join(allowed)}")
        runs.append((which, mode))
    return tuple(runs)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cpus = os.cpu_count() or 1
    deadline = time.monotonic() + args.budget_s
    if args.smoke:
        return Settings(device, smoke=True, backbone="resnet18", size=64, p=2, k=2, warmup=0, steps=2,
                        extract_batch=4, gemm_size=512, amp=False, workers=2, synth_items=12, compile_runs=(),
                        num_items=50, deadline=deadline)
    return Settings(device, smoke=False, backbone="resnet50", size=320, p=16, k=4, warmup=5, steps=args.steps,
                    extract_batch=128, gemm_size=8192, amp=device.type == "cuda", workers=max(1, min(14, cpus - 2)),
                    synth_items=args.synth_items, compile_runs=parse_compile_runs(args.compile_runs),
                    num_items=NUM_ITEMS, deadline=deadline)


def section(results: dict[str, Any], name: str, fn: Callable[[], Any], s: Settings, needs_s: float = 0.0,
            several: bool = False) -> None:
    """Run one measurement; record its result (``several``: a dict of named results), a skip or its error."""
    left = s.deadline - time.monotonic()
    if left < needs_s:
        results[name] = {"error": f"skipped: {left:.0f}s left of the time budget, needs ~{needs_s:.0f}s"}
        log(f"{name}: skipped (time budget)")
        return
    log(f"{name} ...")
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # one failed measurement must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        log(f"{name}: error {results[name]['error']}")
        return
    if several:
        results.update(value)
        shown = {k: round(v.get("images_per_s", 0), 1) for k, v in value.items()}
    else:
        results[name] = value
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()
                 if k in ("images_per_s", "mfu", "tflops", "ratio_vs_resident", "error")}
    log(f"{name}: {shown} ({time.perf_counter() - t0:.1f}s)")


def summarise(results: dict[str, Any], gemm: float | None) -> dict[str, Any]:
    def get(name: str, key: str) -> float | None:
        value = results.get(name, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    mmfl = {k: v["mfu"] for k, v in results.items() if k.startswith("train/mmfl") and "mfu" in v}
    bare = {k: v["mfu"] for k, v in results.items() if k.startswith("train/bare/") and "mfu" in v}
    best = max(mmfl.items(), key=lambda kv: kv[1]) if mmfl else None
    e2e = get("e2e/mmfl/jpeg", "ratio_vs_resident")
    e2e_gpu = get("e2e/mmfl/jpeg-gpu-decode", "ratio_vs_resident")
    load_cpu, load_gpu = get("loader/jpeg", "images_per_s"), get("loader/jpeg-gpu-decode", "images_per_s")
    ex_m, ex_b = get("extract/mmfl", "images_per_s"), get("extract/bare", "images_per_s")
    tr_m, tr_b = get("train/mmfl/eager", "images_per_s"), get("train/bare/eager", "images_per_s")
    return {
        "gemm_tflops": gemm,
        "mmfl_train_mfu": mmfl, "bare_train_mfu": bare,
        "mmfl_train_best": {"variant": best[0], "mfu": best[1]} if best else None,
        "mmfl_train_mfu_target": TARGETS["mmfl_train_mfu"],
        "mmfl_train_mfu_met": bool(best and best[1] >= TARGETS["mmfl_train_mfu"]),
        "train_images_per_s_mmfl_over_bare_eager": tr_m / tr_b if tr_m and tr_b else None,
        "extract_images_per_s_mmfl_over_bare": ex_m / ex_b if ex_m and ex_b else None,
        "e2e_over_resident": e2e,
        "e2e_target": TARGETS["e2e_over_resident"],
        "e2e_met": bool(e2e and e2e >= TARGETS["e2e_over_resident"]),
        "e2e_gpu_decode_over_resident": e2e_gpu,
        "e2e_gpu_decode_met": bool(e2e_gpu and e2e_gpu >= TARGETS["e2e_over_resident"]),
        "loader_gpu_decode_over_cpu_workers": load_gpu / load_cpu if load_gpu and load_cpu else None,
        "graph_parity_max_loss_rel_diff": get("graph/parity", "max_loss_rel_diff"),
        "reference_h100_2026_11_27": REFERENCE,
    }


def _cell(record: dict[str, Any], key: str) -> str:
    return f"{record[key]:.1f}" if key in record else ""


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    st, sm = report["settings"], report["summary"]
    lines = [
        f"# GPU benchmark ({report['env']['device_name']}, {report['created']})", "",
        *(["**Smoke run** (CPU, toy sizes): it exercises the code; its rates, MFU and target lines "
           "measure nothing.", ""] if report["smoke"] else []),
        f"Command: `{report['command']}`. MMFL-Net = `mmfl` preset on {st['backbone']}, bare = torchvision "
        f"{st['backbone']} classifier; {st['size']}x{st['size']}, P x K = {st['p']} x {st['k']} = {st['batch']}, "
        f"bf16 autocast: {st['amp']}, channels_last, fused AdamW. GEMM ({report['gemm'].get('dtype', '?')}, "
        f"{report['gemm'].get('size', '?')}^3): {report['gemm'].get('tflops', float('nan')):.1f} TFLOP/s.", "",
        "| measurement | images/s | step ms | GFLOP/image | TFLOP/s | MFU | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | | | | | | {r['error']} |")
            continue
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k in ("ratio_vs_resident", "warmup_s", "workers", "decode_device", "max_memory_gib",
                                   "compile", "cuda_graph",
                                  "max_loss_rel_diff", "weight_rel_diff", "captured", "capture_failed",
                                  "kernel_ms_per_step"))
        lines.append(f"| {name} | {_cell(r, 'images_per_s')} | {_cell(r, 'step_ms')} | "
                     f"{_cell(r, 'gflops_per_image')} | {_cell(r, 'achieved_tflops')} | "
                     f"{format(r['mfu'] * 100, '.1f') + ' %' if 'mfu' in r else ''} | {notes} |")
    best = sm.get("mmfl_train_best") or {}
    met = {True: "met", False: "not met"}
    lines += [
        "",
        f"- MMFL-Net training MFU, best variant: {best.get('variant')} {100 * best.get('mfu', 0):.1f} % "
        f"(target {100 * sm['mmfl_train_mfu_target']:.0f} %: {met[sm['mmfl_train_mfu_met']]}).",
        f"- End-to-end from JPEG / GPU-resident: {_num(sm['e2e_over_resident'])} "
        f"(target {sm['e2e_target']}: {met[sm['e2e_met']]}); with data.decode=gpu: "
        f"{_num(sm['e2e_gpu_decode_over_resident'])} ({met[sm['e2e_gpu_decode_met']]}); "
        f"its loader alone / the CPU workers' {_num(sm['loader_gpu_decode_over_cpu_workers'])}.",
        f"- Images/s MMFL-Net / bare: training (eager) {_num(sm['train_images_per_s_mmfl_over_bare_eager'])}, "
        f"extraction {_num(sm['extract_images_per_s_mmfl_over_bare'])}.",
        f"- Reference (H100, 2026-11-27): {json.dumps(REFERENCE)}.",
    ]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (resnet18, 64 px, 2 steps, no compile)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default 30)")
    p.add_argument("--synth-items", type=int, default=300, help="items in the generated JPEG dataset (default 300)")
    p.add_argument("--compile-runs", default="mmfl:default+graph,bare:default+graph,mmfl:default",
                   help="compiled training measurements, in order: MODEL:MODE comma list (MODEL mmfl|bare, "
                        "MODE a torch.compile mode; empty for none)")
    p.add_argument("--compile-timeout-s", type=float, default=200.0,
                   help="time-box per compiled measurement (default 200, cut to what the budget has left)")
    p.add_argument("--compile-cache", type=Path,
                   help="folder of compiled artifacts from an earlier run (OUT/compile-cache) to start warm from")
    p.add_argument("--save-compile-cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=270.0, help="skip optional sections after this long")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"what to measure, comma list from {', '.join(SECTIONS)} (default all; the GEMM always runs)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--gemm-tflops", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    threads = torch.get_num_threads()
    if s.smoke:
        torch.set_num_threads(1)  # tiny CPU tensors gain nothing from threads, and CI machines are shared
    try:
        return _run(args, s, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, s: Settings, argv: list[str]) -> int:
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.child:
        which, mode, result = args.child
        compile_mode, graphed = split_mode(mode)
        cache = load_compile_cache(cache_file(args.compile_cache, which, mode)) if args.compile_cache else {}
        rec = measure_train(s, which, args.gemm_tflops or None, compile_mode, graphed)
        if args.save_compile_cache:
            cache.update(save_compile_cache(cache_file(args.save_compile_cache, which, mode)))
        Path(result).write_text(json.dumps({**rec, "compile_cache": cache}))
        return 0
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu"
    log(f"device {s.device} ({device_name}), torch {torch.__version__}, smoke={s.smoke}")
    results: dict[str, Any] = {}
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_bench.py " + " ".join(argv),
        "smoke": s.smoke,
        "env": {"device": str(s.device), "device_name": device_name, "torch": torch.__version__,
                "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "settings": {"backbone": s.backbone, "size": s.size, "p": s.p, "k": s.k, "batch": s.batch, "amp": s.amp,
                     "warmup": s.warmup, "steps": s.steps, "extract_batch": s.extract_batch, "workers": s.workers,
                     "num_items": s.num_items, "num_attributes": NUM_ATTRIBUTES,
                     "compile_runs": [f"{w}:{m}" for w, m in s.compile_runs]},
        "results": results,
    }

    def save() -> None:
        """Write the report so far: a run killed later (time limit, crash) still leaves its measurements."""
        report.update(summary=summarise(results, report["gemm"].get("tflops")),
                      total_s=time.perf_counter() - started)
        from mmfl.atomic import atomic_write_text

        atomic_write_text(args.out / "gpu_bench.json", json.dumps(report, indent=2))
        write_markdown(report, args.out / "gpu_bench.md")

    try:
        report["gemm"] = measure_gemm(s)
        log(f"gemm: {report['gemm']}")
    except Exception as exc:  # MFU is then left out, the rates are still measured
        report["gemm"] = {"error": f"{type(exc).__name__}: {exc}"}
    gemm = report["gemm"].get("tflops")
    save()
    wanted = set(args.sections.split(","))
    if not wanted <= set(SECTIONS):
        raise SystemExit(f"--sections: unknown {sorted(wanted - set(SECTIONS))} (choose from {', '.join(SECTIONS)})")
    graphs = s.device.type == "cuda"  # CUDA graphs need a GPU; the smoke run on CPU has none
    if "train" in wanted and graphs:
        section(results, "graph/parity", lambda: graph_parity(s), s)
        save()
    for which in MODELS if "train" in wanted else ():
        section(results, f"train/{which}/eager", lambda w=which: measure_train(s, w, gemm), s)
        save()
        if graphs:
            section(results, f"train/{which}/graph", lambda w=which: measure_train(s, w, gemm, cuda_graph=True), s)
            save()
    for which in ("mmfl", "bare") if "extract" in wanted else ():
        section(results, f"extract/{which}", lambda w=which: measure_extract(s, w, gemm), s)
        save()
    if "e2e" in wanted:
        section(results, "e2e", lambda: measure_e2e(s), s, needs_s=30, several=True)
        save()
    if "profile" in wanted:
        for which in ("mmfl", "mmfl-frozen-bn"):
            section(results, f"profile/{which}/eager", lambda w=which: profile_train(s, args.out, w), s, needs_s=15)
            save()
    for which, mode in s.compile_runs if "compile" in wanted else ():
        timeout = min(args.compile_timeout_s, s.deadline - time.monotonic())
        cache_dirs = (args.compile_cache, args.out / "compile-cache")
        section(results, f"train/{which}/compile-{mode}",
                lambda w=which, m=mode, t=timeout: run_child(s, w, m, gemm, t, s.smoke, cache_dirs), s, needs_s=45)
        save()
    print((args.out / "gpu_bench.md").read_text(), flush=True)
    log(f"wrote {args.out}/gpu_bench.json and gpu_bench.md in {report['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
