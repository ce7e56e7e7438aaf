"""The ``mmfl`` command line: every subcommand is listed and user errors are one line, exit 2."""
from __future__ import annotations

import subprocess
import sys

from mmfl.cli import COMMANDS, main


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "mmfl.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_config_error_is_one_line(capsys) -> None:  # noqa: ANN001
    code = main(["train", "--config", "mmfl", "model.backbon=resnet18"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: unknown key 'model.backbon'") and "\n" not in err


def test_subcommand_help_documents_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "mmfl.cli", "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--resume" in out and "--config" in out
