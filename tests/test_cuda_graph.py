"""Whole-step CUDA graphs (``train.cuda_graph``): what is refused everywhere, parity on a GPU, and a
checkpoint written by a graphed GPU run resuming on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfl.checkpoint import read_checkpoint
from mmfl.config import ConfigError, load_config
from mmfl.losses import build_criterion
from mmfl.models import build_model
from mmfl.synth import generate
from mmfl.train import train
from mmfl.train.cuda_graph import CapturedStep
from mmfl.train.distributed import DistInfo
from mmfl.train.step import Batch, TrainStep
from mmfl.train.trainer import build_optimizer

TINY = ["model.backbone=resnet18", "input.size=64", "model.neck_width=32", "train.batch_items=4",
        "train.images_per_item=2"]


def _tiny_step(device: torch.device, **kwargs: object) -> tuple[TrainStep, torch.nn.Module]:
    cfg = load_config("mmfl", TINY)
    model = build_model(cfg, 8, 3).to(device).train()
    criterion = build_criterion(cfg, 8, model.global_dim).to(device)
    centers = criterion.center_parameters()
    center_opt = torch.optim.SGD(centers, lr=cfg.loss.center_lr) if centers else None
    step = TrainStep(model, criterion, build_optimizer(cfg, model, device), center_opt, device=device, amp=True,
                     grad_clip=cfg.train.grad_clip, **kwargs)
    return step, model


def _batch(device: torch.device, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, 64, 64, generator=gen)
    attrs = (torch.randint(0, 3, (8, 3), generator=gen) - 1).to(torch.int8)
    batch = Batch(images, torch.arange(4).repeat_interleave(2), torch.tensor([0, 1] * 4), attrs)
    return batch.to(device, channels_last=True) if device.type == "cuda" else batch


def test_graph_needs_a_cuda_device() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CapturedStep(lambda: {}, torch.device("cpu"), scheduled=[opt])


def test_train_step_refuses_graph_combinations_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="makes CUDA graphs itself"):
        _tiny_step(torch.device("cpu"), compile_mode="reduce-overhead", cuda_graph=True)
    with pytest.raises(ValueError, match="one process"):
        _tiny_step(torch.device("cpu"), cuda_graph=True, dist_info=DistInfo(rank=0, world_size=2))


@pytest.mark.parametrize("overrides, message", [
    (["train.cuda_graph=true", "train.optimizer=sgd"], "train.cuda_graph: needs train.optimizer=adamw"),
    (["train.cuda_graph=true", "train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.cuda_graph: compile_mode reduce-overhead makes its own CUDA graphs"),
])
def test_config_names_the_conflicting_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("mmfl", overrides)


def test_checkpoint_of_a_graphed_gpu_run_resumes_on_cpu(tmp_path: Path) -> None:
    """A graphed run saves fused, capturable AdamW groups; a CPU resume must step its own way
    (capturable AdamW refuses CPU tensors) and still train on: the loss stays finite."""
    root = tmp_path / "data"
    generate(root, items=16, seed=5, size=64)
    common = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.backbone=resnet18", "input.size=64",
              "train.batch_items=4", "train.images_per_item=2", "data.num_workers=0", "train.tensorboard=false",
              "train.eval_every=0", "train.max_steps_per_epoch=2", "train.warmup_epochs=0", "train.cuda_graph=true",
              "train.device=cpu"]
    first = train(load_config("global", [*common, "train.epochs=1"]), progress=False)
    last = first.last_checkpoint
    ckpt = read_checkpoint(last, map_location="cpu")
    for group in ckpt["train_state"]["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True)  # as CapturedStep leaves them on a GPU
    torch.save(ckpt, last)
    train(load_config("global", [*common, "train.epochs=2"]), resume=True, progress=False)
    state = read_checkpoint(last, map_location="cpu")["train_state"]
    assert state["epoch"] == 2
    assert all(not g["capturable"] for g in state["optimizer"]["param_groups"])
    assert all(row["loss"] == row["loss"] for row in state["history"] if row["kind"] == "epoch")  # finite, not NaN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_step_matches_eager_on_gpu() -> None:
    """Warm-ups, capture, replays with new batches and a changed lr, then a batch of another shape
    (eager fallback): the same losses and weights as the eager step, within bf16 kernel noise."""
    device = torch.device("cuda")
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        step, model = _tiny_step(device, cuda_graph=graphed)
        losses = []
        for i in range(7):
            if i == 5:
                for group in step.optimizer.param_groups:
                    group["lr"] *= 0.5
            batch = _batch(device, i % 3)
            if i == 6:  # a smaller batch: runs eagerly beside the graph
                batch = Batch(batch.images[:4], batch.labels[:4], batch.domains[:4], batch.attributes[:4])
            losses.append(float(step(batch)["total"]))
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        runs.append((losses, weights, step.graph))
    (eager, w_eager, _), (graphed_losses, w_graph, graph) = runs
    assert graph is not None and graph.captured
    assert graphed_losses == pytest.approx(eager, rel=2e-2)
    assert float((w_graph - w_eager).norm() / w_eager.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_runs_graphed_on_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mmfl train`` with ``train.cuda_graph=true`` on a GPU: captured, finite losses, resumable."""
    root = tmp_path / "data"
    generate(root, items=60, seed=5, size=64)  # 42 training items: 10 steps of 4 items, 3 of them warm-up
    common = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.backbone=resnet18", "input.size=64",
              "train.batch_items=4", "train.images_per_item=2", "data.num_workers=0", "train.tensorboard=false",
              "train.eval_every=0", "train.warmup_epochs=0", "train.cuda_graph=true", "train.device=cuda"]
    result = train(load_config("mmfl", [*common, "train.epochs=1"]), progress=False)
    assert "captured and replayed as one CUDA graph" in capsys.readouterr().err
    train(load_config("mmfl", [*common, "train.epochs=2"]), resume=True, progress=False)
    history = read_checkpoint(result.last_checkpoint, map_location="cpu")["train_state"]["history"]
    losses = [row["loss"] for row in history if row["kind"] == "epoch"]
    assert len(losses) == 2 and all(loss == loss and loss < 1e4 for loss in losses)
