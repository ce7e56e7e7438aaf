"""A new user's first hour: defaults that train, logs that read well in a file, and bad input
refused with one line before anything is written.

Everything runs on a tiny generated dataset with an untrained ResNet-18 (``model.pretrained=none``
pinned, except where the ImageNet default itself is under test).
"""
from __future__ import annotations

import fcntl
import math
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path

import pytest

from mmfl.cli import build_parser, main, parse_args
from mmfl.config import ConfigError, load_config
from mmfl.data.formats import read_dataset
from mmfl.errors import DataError, MMFLError
from mmfl.progress import Progress
from mmfl.synth import generate
from mmfl.train import train

SIZE = 48
TINY = [
    "model.backbone=resnet18", "model.pretrained=none", f"input.size={SIZE}", "train.batch_items=4",
    "train.images_per_item=2", "data.num_workers=0", "train.tensorboard=false", "train.warmup_epochs=0",
    "train.max_steps_per_epoch=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first hour") / "data"
    generate(root, items=16, seed=4, size=SIZE)
    return root


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained step of the global preset: a real checkpoint, config.yaml and metrics.jsonl."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config("global", [f"data.root={data}", f"output_dir={out}", *TINY, "train.epochs=1",
                                 "train.eval_every=0"]), progress=False)
    return out


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *words: str) -> str:
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: compared before and after a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. defaults that train

def test_presets_start_from_imagenet_by_default() -> None:
    for preset in ("global", "mgn", "mmfl"):
        assert load_config(preset).model.pretrained == "imagenet"


def test_imagenet_offline_is_one_line_naming_the_ways_out(data: Path, tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights in the hub cache and no way to download them (a proxy on a closed port): one line
    saying where to put the file, or how to pass a local file or none, and no output folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", f"output_dir={out}",
                     *[o for o in TINY if not o.startswith("model.pretrained")])
    one_line_error(rc, err, "model.pretrained=imagenet", "resnet18-f37072fd.pth", str(tmp_path / "torch"),
                   "model.pretrained=/path/to/", "model.pretrained=none")
    assert not out.exists()


def test_random_initialisation_warns_once(data: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", f"output_dir={tmp_path / 'run'}",
                     *TINY, "train.epochs=0")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: model.pretrained=none")]
    assert len(warnings) == 1 and "random weights" in warnings[0]


# ----------------------------------------------------------------------------- 3. logs

def test_progress_off_a_terminal_is_plain_lines_at_tenths() -> None:
    stream = StringIO()
    bar = Progress(20, "queries", stream=stream, interval_s=0.0)
    for _ in range(20):
        bar.update(1, loss="1.000")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "queries: 2/20 (10%) loss 1.000" and lines[-1] == "queries: 20/20 (100%) loss 1.000"
    assert len(lines) == 10


def test_logs_redirected_to_a_file_have_no_carriage_returns(data: Path, run: Path, tmp_path: Path) -> None:
    """``mmfl train`` (progress on, validation every epoch) and ``mmfl eval`` with stderr in a file:
    no bar frames, and train's own one line per epoch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "mmfl.cli", "train", "--config", "global", f"data.root={data}",
                               f"output_dir={tmp_path / 'run'}", *TINY, "train.epochs=2"],
                              stderr=fh, stdout=subprocess.DEVNULL, env=env, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    for epoch in (1, 2):
        line = next(line for line in text.splitlines() if line.startswith(f"epoch {epoch}: loss "))
        assert line.endswith(" img/s)"), line
        assert f"epoch {epoch}: val top1" in text

    log = tmp_path / "eval.log"
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "mmfl.cli", "eval", str(run / "checkpoints" / "last.pt"),
                               "--data", str(data), "--split", "val", "--workers", "0"],
                              stderr=fh, stdout=subprocess.DEVNULL, env=env, timeout=600)
    assert done.returncode == 0, log.read_text()
    assert "\r" not in log.read_text()


@contextmanager
def terminal_stderr() -> Iterator[list[bytes]]:
    """``sys.stderr`` on a real pseudo-terminal (raw, so only the writer's own ``\\r`` appear);
    what reached it is in the yielded list once the block ends."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100, as a window has
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the terminal side is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = os.fdopen(slave, "w", buffering=1)
    saved, sys.stderr = sys.stderr, terminal
    try:
        yield chunks
    finally:
        sys.stderr = saved
        terminal.close()
        reader.join(timeout=30)
        os.close(master)


def test_no_progress_silences_the_validation_bars_too(data: Path, tmp_path: Path) -> None:
    """On a terminal a training run draws bars (train steps, then the validation's queries and
    gallery); with progress off there are none at all, and the epoch lines remain."""
    overrides = [f"data.root={data}", *TINY, "train.epochs=1"]
    for progress in (True, False):
        with terminal_stderr() as chunks:
            train(load_config("global", [*overrides, f"output_dir={tmp_path / str(progress)}"]), progress=progress)
        text = b"".join(chunks).decode("utf-8", "replace")
        assert "epoch 1: loss " in text and "epoch 1: val top1" in text
        assert ("\r" in text and "queries" in text) is progress, text


def test_every_subcommand_with_progress_takes_no_progress() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "eval", "index", "demo"):
        flags = {s for action in subcommands[name]._actions for s in action.option_strings}
        assert "--no-progress" in flags, name


# ----------------------------------------------------------------------------- 5. refused before harm

def test_resume_with_another_model_names_the_keys_and_touches_nothing(data: Path, run: Path, capsys) -> None:
    before = tree(run)
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", f"output_dir={run}", *TINY,
                     "train.epochs=2", "model.backbone=resnet34", "model.branches=[{name: global, level: 5, dim: 64}]",
                     "--resume")
    one_line_error(rc, err, "--resume", str(run / "checkpoints" / "last.pt"),
                   "model.backbone: 'resnet18' in the checkpoint, 'resnet34' now",
                   "model.branches[0].dim: 512 in the checkpoint, 64 now")
    assert tree(run) == before


@pytest.mark.parametrize(("override", "words"), [
    ("train.epochs=-1", "train.epochs: -1 is negative"),
    ("train.lr=0", "train.lr: 0.0 must be a positive number"),
    ("train.lr=-0.1", "train.lr: -0.1 must be a positive number"),
    ("train.lr=nan", "train.lr: nan must be a positive number"),
    ("train.weight_decay=-1e-4", "train.weight_decay: -0.0001 must be 0 or a positive number"),
])
def test_impossible_training_numbers_are_refused(override: str, words: str, data: Path, tmp_path: Path,
                                                 capsys) -> None:
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", f"output_dir={out}", *TINY, override)
    one_line_error(rc, err, words)
    assert not out.exists()


def test_export_size_zero_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    onnx = tmp_path / "model.onnx"
    rc, _, err = cli(capsys, "export", run / "checkpoints" / "last.pt", "--onnx", onnx, "--size", "0")
    one_line_error(rc, err, "--size 0", "too small")
    assert not onnx.exists()


def test_space_in_a_path_of_the_pair_file_is_named(data: Path, tmp_path: Path) -> None:
    """Consumer-to-shop's partition rows hold two paths; a space in one cannot be told from the separator."""
    copy = tmp_path / "data"
    copy.mkdir()
    for sub in ("img", "Anno"):
        (copy / sub).symlink_to(data / sub)
    partition = copy / "Eval" / "list_eval_partition.txt"
    partition.parent.mkdir()
    lines = (data / "Eval" / "list_eval_partition.txt").read_text().splitlines()
    lines[2] = lines[2].replace("shop_", "my shop_", 1)
    partition.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        read_dataset(copy, "deepfashion-c2s")
    message = str(exc.value)
    assert message.startswith(f"{partition}:3: expected 4 columns")
    assert "found 5; paths with spaces are not supported in this whitespace-separated file" in message


def test_a_text_file_is_not_a_checkpoint_and_says_what_it_is(data: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello world\n")
    rc, _, err = cli(capsys, "eval", text, "--data", data, "--no-progress")
    line = one_line_error(rc, err, str(text), "not an mmfl checkpoint (a text file, not a file written by torch.save)")
    assert "KeyError" not in line
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", f"output_dir={out}", *TINY,
                     f"model.pretrained={text}")
    one_line_error(rc, err, str(text), "not a weights file (a text file")
    assert not out.exists()


def test_flags_may_stand_among_overrides(data: Path, tmp_path: Path, capsys) -> None:
    args = parse_args(build_parser(), ["train", "--config", "mmfl", "data.root=x", "--no-progress", "train.epochs=1",
                                       "--resume", "seed=3"])
    assert args.overrides == ["data.root=x", "train.epochs=1", "seed=3"] and args.no_progress and args.resume
    # the override after the flag takes effect: it is the one refused here
    rc, _, err = cli(capsys, "train", "--config", "global", f"data.root={data}", "--no-progress", "train.lr=-1",
                     f"output_dir={tmp_path / 'run'}")
    one_line_error(rc, err, "train.lr: -1.0")
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "data.root=x", "--nope", "train.epochs=1"])


def test_validate_accepts_the_shipped_presets_and_zero_epochs() -> None:
    for preset in ("global", "mgn", "mmfl"):
        cfg = load_config(preset, ["train.epochs=0", "train.weight_decay=0"])
        assert cfg.train.epochs == 0 and math.isfinite(cfg.train.lr)
    with pytest.raises(ConfigError):
        load_config("mmfl", ["train.lr=inf"])
    assert issubclass(ConfigError, MMFLError)
