"""``mmfl demo`` end to end at toy size: every stage runs and the report holds real numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path

from mmfl.cli import main


def test_demo_writes_report_with_metrics(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "demo out"
    code = main(["demo", "--out", str(out), "--items", "24", "--epochs", "1", "--size", "64",
                 "--backbone", "resnet18", "--pretrained", "none", "--workers", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    for stage in ("== synth ==", "== train ==", "== eval ==", "== index + search =="):
        assert stage in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 2 and all(0.0 <= m["top1"] <= 1.0 and m["num_queries"] > 0 for m in metrics.values())
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert len(re.findall(r"<td>\d+\.\d</td>", page)) == 12  # 2 models x 6 metrics
    assert (out / "index" / "manifest.json").is_file()
    assert re.search(r"^  1\. id_\d{8}  score", printed, re.M)
    # the query searched with the dataset's box, then with none: the box head's garment box
    assert re.search(r"^ box \d+,\d+,\d+,\d+ \[user: ", printed, re.M)
    assert re.search(r"^ (box \d+,\d+,\d+,\d+ \[predicted: |whole photo \[whole: no garment found)", printed, re.M)
