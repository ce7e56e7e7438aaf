"""A self-contained HTML report of a run: metrics table, CMC curve, ranked results, notes.

Images are embedded as base64 so the report is one file that can be mailed or attached to
an issue.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from mmfl.atomic import atomic_write_text

METRIC_KEYS = ("top1", "top5", "top10", "top20", "top50", "mAP")


def write_report(
    path: Path,
    title: str,
    results: dict[str, dict[str, Any]],
    images: dict[str, Path],
    notes: list[str],
) -> Path:
    """Write ``path``: one metrics row per entry of ``results``, then each image with its caption."""
    rows = []
    for name, metrics in results.items():
        cells = "".join(f"<td>{100 * float(metrics[k]):.1f}</td>" for k in METRIC_KEYS)
        counts = f"{metrics.get('num_queries', '?')} / {metrics.get('num_gallery', '?')}"
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>{counts}</td></tr>")
    head = "".join(f"<th>{k if k == 'mAP' else 'top-' + k[3:]} (%)</th>" for k in METRIC_KEYS)
    figures = []
    for caption, image in images.items():
        if image.is_file():
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            figures.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
tr th:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Top-k accuracy is the hit rate: a query counts at k when any shop image of its item is among the k nearest.</p>
<table><tr><th>model</th>{head}<th>queries / gallery</th></tr>{''.join(rows)}</table>
<ul>{note_items}</ul>
{''.join(figures)}
</body></html>
"""
    return atomic_write_text(path, page)
