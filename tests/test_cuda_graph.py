"""Whole-step CUDA graphs (``train.cuda_graph``): what is refused everywhere, parity on a GPU, a
checkpoint written by a graphed GPU run resuming on the CPU, and, without a GPU, that every
preset's step is capturable at all (no host reads: :func:`capture_hazard` on the meta device)."""
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
from mmfl.train.cuda_graph import CapturedStep, capture_hazard
from mmfl.train.distributed import DistInfo
from mmfl.train.step import Batch, TrainStep
from mmfl.train.trainer import build_optimizer

TINY = ["model.backbone=resnet18", "model.pretrained=none", "input.size=64", "model.neck_width=32", "train.batch_items=4",
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
    common = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.backbone=resnet18",
              "model.pretrained=none", "input.size=64", "train.batch_items=4", "train.images_per_item=2",
              "data.num_workers=0", "train.tensorboard=false",
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


META = torch.device("meta")
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("body, message", [
    (lambda x: x.sum().item(), "item"),
    (lambda x: float(x.max()) > 0, "item"),
    (lambda x: x[x > 0].sum(), "nonzero"),
    (lambda x: x.tolist(), "Cannot copy out of meta tensor"),
    (lambda x: x.cpu(), "Cannot copy out of meta tensor"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]).to(x.device), "copies a host tensor of shape (3,) to the device"),
    (lambda x: torch.arange(3, device=x.device).repeat_interleave(x.long()[:3, 0]), "output_size"),
])
def test_capture_hazard_names_the_line_that_reads_the_device(body: object, message: str) -> None:
    x = torch.empty(4, 3, device=META)
    found = capture_hazard(lambda: body(x), source_root=HERE)  # type: ignore[operator]
    assert found is not None and found.startswith("test_cuda_graph.py:") and message in found


def test_capture_hazard_passes_device_only_code() -> None:
    x = torch.empty(4, 3, device=META, requires_grad=True)

    def run() -> None:  # masks by multiplication, constants made on the device, a 0-dim host scalar
        mask = (x > 0).float()
        y = torch.where(x > 0, x, 0.0) * mask + torch.eye(3, device=x.device)[0] + torch.tensor(2.0)
        y.sum().backward()

    assert capture_hazard(run) is None


def _meta_step(preset: str, overrides: list[str]) -> tuple[TrainStep, tuple[torch.Tensor, ...]]:
    """The preset's real step at the GPU benchmark's size (ResNet-50, 320 px, 16 x 4, 5,000 items), on meta."""
    cfg = load_config(preset, ["model.pretrained=none", "input.size=320", "train.batch_items=16", "train.images_per_item=4", *overrides])
    with META:
        model = build_model(cfg, 5000, 303, 50).train()
        criterion = build_criterion(cfg, 5000, model.global_dim)
    centers = criterion.center_parameters()
    center_opt = torch.optim.SGD(centers, lr=cfg.loss.center_lr) if centers else None
    step = TrainStep(model, criterion, build_optimizer(cfg, model, META), center_opt, device=META, amp=True,
                     grad_clip=cfg.train.grad_clip)
    n = 64
    inputs = (torch.empty(n, 3, 320, 320, device=META), torch.arange(16, device=META).repeat_interleave(4),
              torch.arange(n, device=META) % 2, torch.zeros(n, 303, dtype=torch.int8, device=META),
              torch.zeros(n, dtype=torch.long, device=META))
    return step, inputs


@pytest.mark.parametrize("preset, overrides", [
    ("mmfl", ["loss.category_weight=1.0"]),  # every loss term on: ID, improved trihard, center, attributes, category
    ("mmfl", ["model.backbone_norm=frozen", "loss.triplet=batch_hard"]),
    ("mgn", []),
    ("global", ["loss.triplet=batch_hard"]),
])
def test_every_preset_step_can_be_captured(preset: str, overrides: list[str]) -> None:
    """What a GPU would refuse mid-capture, found without one: the forward, all loss terms and the
    backward read nothing back to the host (the clip and the fused AdamW are PyTorch's capturable ones)."""
    step, inputs = _meta_step(preset, overrides)
    terms = {}
    assert capture_hazard(lambda: terms.update(step.forward_backward(*inputs))) is None
    assert {"total", "id", "triplet"} <= set(terms) and all(t.device == META for t in terms.values())
    assert all(p.grad is not None for p in step.model.parameters() if p.requires_grad)


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
    common = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.backbone=resnet18",
              "model.pretrained=none", "input.size=64", "train.batch_items=4", "train.images_per_item=2",
              "data.num_workers=0", "train.tensorboard=false",
              "train.eval_every=0", "train.warmup_epochs=0", "train.cuda_graph=true", "train.device=cuda"]
    result = train(load_config("mmfl", [*common, "train.epochs=1"]), progress=False)
    assert "captured and replayed as one CUDA graph" in capsys.readouterr().err
    train(load_config("mmfl", [*common, "train.epochs=2"]), resume=True, progress=False)
    history = read_checkpoint(result.last_checkpoint, map_location="cpu")["train_state"]["history"]
    losses = [row["loss"] for row in history if row["kind"] == "epoch"]
    assert len(losses) == 2 and all(loss == loss and loss < 1e4 for loss in losses)
