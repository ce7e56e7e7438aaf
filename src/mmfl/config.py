"""Typed run configuration: dataclass schema, YAML presets, ``key=value`` overrides.

Every module takes plain arguments; this file is the one place that knows the whole
schema. Presets live in ``mmfl/configs/<name>.yaml`` (also reachable as ``configs/`` at the
repository root) and hold only what differs from the defaults below. Errors are one line,
name the key and say what is allowed, because a typo in a 3-hour run should fail in a second.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mmfl.atomic import atomic_write_text
from mmfl.errors import MMFLError

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(MMFLError, ValueError):
    """A config file, preset or override is wrong; the message is one line naming the key."""


@dataclass
class BranchSpec:
    """One retrieval branch, described as data.

    ``level`` is the pyramid level the branch reads (2..5 = stride 4..32). ``source`` says which
    map: the fusion neck's output at that level (``fused``, when fusion is on) or the backbone
    stage itself (``backbone``: the pretrained features, untouched by new layers). ``partition`` is ``whole``, ``stripes:N``
    (N horizontal stripes, MGN-style) or ``grid:RxC`` (local patches). Each part gets its own
    embedding of width ``dim`` with a BNNeck and an ID classifier; ``with_whole`` adds one
    embedding of the whole map to a partitioned branch (as MGN's part branches do).
    """

    name: str = "global"
    level: int = 5
    source: Literal["fused", "backbone"] = "fused"
    partition: str = "whole"
    pooling: Literal["avg", "max", "gem"] = "avg"
    dim: int = 256
    with_whole: bool = False


@dataclass
class DataConfig:
    root: str = ""
    format: Literal["deepfashion-c2s", "inshop", "street2shop", "deepfashion2", "csv", "folder",
                    "folder-photos"] = "deepfashion-c2s"
    train_split: str = "train"
    val_split: str = "val"
    # auto: a shop's photo folder (the folder formats) skips unreadable photos, one line each; an
    # annotated dataset refuses them (its labels say the photo should be there). true/false: always.
    skip_bad: Literal["auto", True, False] = "auto"
    num_workers: int = 2
    # gpu: loader workers only read JPEG bytes; decoding (nvJPEG) and the training augmentation run as
    # batched ops on the training device (mmfl.data.gpu_decode). Without CUDA: the CPU path, one notice.
    decode: Literal["cpu", "gpu"] = "cpu"
    # Consumer-style views generated from shop photos (mmfl.data.generated_views): how hard (none = never),
    # what share of the consumer side they make up ("auto": all of it on catalogue-only data, none where
    # the dataset has consumer photos), how many per item, their canvas (0 = 2 x input.size, at
    # most 384), the seed of the held-out views validation and eval score on, and where those are cached.
    views: Literal["none", "standard", "hard"] = "hard"
    view_mix: str = "auto"
    views_per_item: int = 3
    view_size: int = 0
    view_seed: int = 0
    view_cache: str = ""


@dataclass
class InputConfig:
    size: int = 256
    flip: bool = True
    crop_scale_min: float = 0.6
    color_jitter: float = 0.2
    random_erasing: float = 0.5


@dataclass
class ModelConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"] = "resnet50"
    # imagenet | none | path to a state dict. ImageNet by default: from random weights a short run
    # learns next to nothing (val top-1 0.04 after an epoch where the ImageNet start reached 0.80).
    pretrained: str = "imagenet"
    last_stride: Literal[1, 2] = 1
    freeze_stages: int = 0  # backbone stages (0..4) kept frozen, for small CPU budgets
    backbone_norm: Literal["bn", "frozen"] = "bn"  # frozen: ImageNet BN statistics and affine kept fixed
    fusion: Literal["none", "topdown", "bidirectional"] = "none"
    fusion_levels: list[int] = field(default_factory=lambda: [4, 5])  # 4..5 beat 3..5: docs/RESULTS.md, "Hard protocol"
    neck_width: int = 256
    branches: list[BranchSpec] = field(default_factory=lambda: [BranchSpec()])
    attribute_head: bool = True
    category_head: bool = False
    # Garment box prediction (mmfl.models.box_head; trained after retrieval by the ``box`` stage).
    box_head: bool = False
    box_level: int = 4  # pyramid level the box head reads (3..5; stride 8..32)
    # backbone: only the stages up to box_level run for detection (cheapest query); fused: the neck's map
    box_source: Literal["backbone", "fused"] = "backbone"
    box_width: int = 64  # channels of the box head's two 3x3 convs


@dataclass
class LossConfig:
    id_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet: Literal["none", "batch_hard", "improved"] = "improved"
    triplet_weight: float = 1.0
    margin: float = 0.3
    cross_domain_weight: float = 0.5  # improved trihard: share of the consumer<->shop-only term
    center_weight: float = 5e-4  # 0 disables the center loss
    center_lr: float = 0.5
    attribute_weight: float = 1.0  # 0 disables the attribute BCE
    category_weight: float = 0.0  # 0 disables the category CE


@dataclass
class BoxConfig:
    """The box stage (mmfl.train.boxes), run after retrieval training when ``model.box_head`` is on.

    ``freeze_features`` keeps everything but the box head fixed (backbone in eval mode), so the
    retrieval embedding, and any index built with it, stays bit-identical; false lets the box loss
    fine-tune the backbone stages the head reads (the embedding then changes).
    """

    # square detection input in pixels (the whole photo is resized to it); 64 met the targets
    # (>= 80 % of the top-1 gap for <= 15 % query latency), 96 finds better boxes for +20 % (docs/RESULTS.md)
    size: int = 64
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    max_steps_per_epoch: int = 0  # 0 = a full pass over the training photos
    freeze_features: bool = True
    max_boxes: int = 10  # boxes decoded per photo (top-k centre peaks)
    min_score: float = 0.3  # below it a box is not reported (the whole photo is searched instead)


#: ``torch.compile`` modes that replay CUDA graphs of their own (they cannot nest inside a whole-step graph).
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_items: int = 16  # P
    images_per_item: int = 4  # K
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 2
    schedule: Literal["cosine", "step"] = "cosine"
    step_milestones: list[int] = field(default_factory=lambda: [20, 27])
    step_gamma: float = 0.1
    grad_clip: float = 5.0  # 0 disables clipping
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    channels_last: bool = True
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cuda_graph: bool = False  # replay the whole step as one CUDA graph (one GPU, adamw); ignored on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    eval_every: int = 1  # epochs between validation runs; 0 disables validation
    max_steps_per_epoch: int = 0  # 0 = a full pass over the items
    tensorboard: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 64
    flip: bool = False
    rerank: bool = False
    gallery_splits: list[str] = field(default_factory=list)  # empty = the query split only


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    box: BoxConfig = field(default_factory=BoxConfig)
    output_dir: str = "runs/latest"
    seed: int = 0


def preset_names() -> list[str]:
    """Names usable as ``--config NAME``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | Path | None = "mmfl", overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML path plus ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = _resolve(str(preset_or_path)) if preset_or_path else None
    if source is not None:
        raw = _read_yaml(source)
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as exc:  # name the file the bad key is in
        raise ConfigError(f"{source}: {exc}") from None
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config stored in a checkpoint or a ``config.yaml``."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (``config.yaml`` beside every run's outputs)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed as YAML, then type-checked)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    target: Any = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown key '{key}': '{'.'.join(parts[:depth])}' has no sub-keys")
        hints = get_type_hints(type(target))
        if name not in hints:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"unknown key '{key}' (allowed at {where}: {', '.join(hints)})")
        if depth == len(parts) - 1:
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            setattr(target, name, _coerce(value, hints[name], key))
        else:
            target = getattr(target, name)


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.input.size < 32:
        raise ConfigError(f"input.size: {cfg.input.size} is too small (use 32 or more)")
    if cfg.train.batch_items < 2 and cfg.loss.triplet != "none":
        raise ConfigError("train.batch_items: a triplet loss needs at least 2 items per batch")
    if cfg.train.images_per_item < 1:
        raise ConfigError("train.images_per_item: must be at least 1")
    if not cfg.model.branches:
        raise ConfigError("model.branches: at least one branch is needed")
    names = [b.name for b in cfg.model.branches]
    if len(set(names)) != len(names):
        raise ConfigError(f"model.branches: branch names must be unique, got {names}")
    for i, b in enumerate(cfg.model.branches):
        parse_partition(b.partition, f"model.branches[{i}].partition")
        if not 2 <= b.level <= 5:
            raise ConfigError(f"model.branches[{i}].level: {b.level} not in 2..5 (stride 4..32)")
        if cfg.model.fusion != "none" and b.source == "fused" and b.level not in cfg.model.fusion_levels:
            raise ConfigError(
                f"model.branches[{i}].level: {b.level} is not a fused level {cfg.model.fusion_levels}"
            )
        if b.dim < 1:
            raise ConfigError(f"model.branches[{i}].dim: must be positive")
    if cfg.model.fusion != "none" and all(b.source == "backbone" for b in cfg.model.branches):
        raise ConfigError("model.fusion: fusion is on but no branch reads a fused map (source: fused)")
    if any(not 2 <= lv <= 5 for lv in cfg.model.fusion_levels) or len(cfg.model.fusion_levels) < 1:
        raise ConfigError(f"model.fusion_levels: {cfg.model.fusion_levels} must be levels in 2..5")
    if not 0 <= cfg.model.freeze_stages <= 4:
        raise ConfigError("model.freeze_stages: must be in 0..4")
    if cfg.train.cuda_graph and cfg.train.optimizer != "adamw":
        raise ConfigError("train.cuda_graph: needs train.optimizer=adamw (fused AdamW reads its scheduled lr "
                          "from GPU memory; SGD's would be frozen into the graph)")
    if cfg.train.cuda_graph and cfg.train.compile and cfg.train.compile_mode in GRAPH_COMPILE_MODES:
        raise ConfigError(f"train.cuda_graph: compile_mode {cfg.train.compile_mode} makes its own CUDA graphs; "
                          "use default or max-autotune-no-cudagraphs with it")
    _check_training_numbers(cfg.train)
    _check_views(cfg.data)
    _check_box(cfg)
    if not 0.0 <= cfg.loss.cross_domain_weight <= 1.0:
        raise ConfigError(f"loss.cross_domain_weight: {cfg.loss.cross_domain_weight} must lie in [0, 1]")


def _check_training_numbers(t: TrainConfig) -> None:
    """Values a run would accept and then waste: a negative epoch count trains nothing yet reports a
    checkpoint, and a zero, negative or NaN learning rate dies in the optimizer with a traceback."""
    for key, value in (("epochs", t.epochs), ("warmup_epochs", t.warmup_epochs),
                       ("max_steps_per_epoch", t.max_steps_per_epoch), ("eval_every", t.eval_every)):
        if value < 0:
            raise ConfigError(f"train.{key}: {value} is negative (use 0 or more)")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"train.lr: {t.lr} must be a positive number")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay: {t.weight_decay} must be 0 or a positive number")


def view_mix(data: DataConfig) -> float | None:
    """``data.view_mix`` as a share in [0, 1], or None for ``auto`` (decided by the data)."""
    if data.view_mix == "auto":
        return None
    try:
        share = float(data.view_mix)
    except ValueError:
        raise ConfigError(f"data.view_mix: {data.view_mix!r} is not auto or a number in [0, 1]") from None
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"data.view_mix: {data.view_mix} must lie in [0, 1] (or be auto)")
    return share


def _check_views(data: DataConfig) -> None:
    view_mix(data)
    if data.views_per_item < 1:
        raise ConfigError(f"data.views_per_item: {data.views_per_item} must be at least 1")
    if data.view_size != 0 and data.view_size < 32:
        raise ConfigError(f"data.view_size: {data.view_size} is too small (0 = automatic, else 32 or more)")


def _check_box(cfg: Config) -> None:
    """The box head's level must be one the model computes, and the stage's numbers usable."""
    m, b = cfg.model, cfg.box
    if not 3 <= m.box_level <= 5:
        raise ConfigError(f"model.box_level: {m.box_level} not in 3..5 (stride 8..32)")
    if m.box_head and m.box_level > max(br.level for br in m.branches):
        raise ConfigError(f"model.box_level: {m.box_level} is above every branch's level, so the backbone "
                          f"does not compute it; use {max(br.level for br in m.branches)} or lower")
    if m.box_head and m.box_source == "fused":
        fused = m.fusion != "none" and any(br.source == "fused" and br.level == m.box_level for br in m.branches)
        if not fused:
            raise ConfigError(f"model.box_source: fused needs fusion on and a branch reading the fused level "
                              f"{m.box_level}; use model.box_source=backbone")
    if m.box_head and not b.freeze_features and m.freeze_stages >= m.box_level - 1:
        raise ConfigError(f"box.freeze_features: false has nothing to fine-tune: model.freeze_stages="
                          f"{m.freeze_stages} freezes every backbone stage up to box_level {m.box_level}")
    if m.box_width < 1:
        raise ConfigError(f"model.box_width: {m.box_width} must be positive")
    if b.size < 32:
        raise ConfigError(f"box.size: {b.size} is too small (use 32 or more)")
    for key, value in (("epochs", b.epochs), ("max_steps_per_epoch", b.max_steps_per_epoch)):
        if value < 0:
            raise ConfigError(f"box.{key}: {value} is negative (use 0 or more)")
    if b.batch_size < 1 or b.max_boxes < 1:
        raise ConfigError(f"box.batch_size and box.max_boxes must be at least 1, got {b.batch_size}, {b.max_boxes}")
    if not (math.isfinite(b.lr) and b.lr > 0):
        raise ConfigError(f"box.lr: {b.lr} must be a positive number")
    if not 0.0 <= b.min_score < 1.0:
        raise ConfigError(f"box.min_score: {b.min_score} must lie in [0, 1)")


def parse_partition(text: str, key: str = "partition") -> tuple[int, int]:
    """``whole`` -> (1, 1); ``stripes:N`` -> (N, 1); ``grid:RxC`` -> (R, C)."""
    try:
        if text == "whole":
            return 1, 1
        kind, _, arg = text.partition(":")
        if kind == "stripes":
            rows, cols = int(arg), 1
        elif kind == "grid":
            r, _, c = arg.partition("x")
            rows, cols = int(r), int(c)
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}: '{text}' is not one of whole, stripes:N, grid:RxC") from None
    if rows < 1 or cols < 1:
        raise ConfigError(f"{key}: '{text}' needs positive part counts")
    return rows, cols


def _resolve(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{name}' does not exist")
        return path
    preset = PRESET_DIR / f"{name}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name}' (presets: {', '.join(preset_names())}; or give a .yaml path)")
    return preset


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown key '{key}' (allowed: {', '.join(hints)})")
    obj = cls()
    for name, value in raw.items():
        setattr(obj, name, _coerce(value, hints[name], f"{prefix}{name}"))
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, f"{key}.")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed (choose one of {', '.join(map(str, allowed))})")
        return value
    if origin is list:
        (item_hint,) = get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_hint is not BranchSpec:
            value = [v for v in str(value).split(",") if v] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported schema type {hint!r}")
