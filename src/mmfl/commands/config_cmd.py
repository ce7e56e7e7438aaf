"""``mmfl config show PRESET|FILE [key=value ...]`` and ``mmfl config keys``: the config, explained.

``show`` resolves a preset or YAML file plus overrides exactly as ``mmfl train`` does
(:func:`mmfl.config.load_config`, same one-line errors) and prints every key with its value and
its help line (:mod:`mmfl.config_help`), so the effect of a preset and of each override can be
read before a run. ``keys`` lists the schema: type or choices, default, help.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import yaml


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the resolved config: every key, its value and one line of help",
                              description="Print the config that 'mmfl train --config PRESET|FILE key=value ...' "
                                          "would run with: every key, its value and one line of help.")
    show.add_argument("config", metavar="PRESET|FILE", help="preset name (global, mgn, mmfl) or a YAML file")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3")
    show.set_defaults(func=run_show)
    keys = actions.add_parser("keys", help="list every config key with its type or choices, default and help",
                              description="List every config key with its type or choices, default and help.")
    keys.set_defaults(func=run_keys)


def run_show(args: argparse.Namespace) -> int:
    from mmfl.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    rows = [(key, flow(value)) for key, value in flatten(config_to_dict(cfg))]
    source = f"# {args.config}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
    print(source)
    print(format_rows(rows))
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from mmfl.config_help import schema_keys

    rows = [(k.key, k.kind, "-" if dataclasses.is_dataclass(k.default) else flow(_plain(k.default)))
            for k in schema_keys()]
    print(format_rows(rows, header=("key", "type", "default")))
    return 0


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted ``(key, value)`` pairs of a config dict; each branch of a list of mappings gets ``[i]``."""
    out: list[tuple[str, Any]] = []
    for name, value in tree.items():
        key = prefix + name
        if isinstance(value, dict):
            out.extend(flatten(value, key + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.extend(flatten(item, f"{key}[{i}]."))
        else:
            out.append((key, value))
    return out


def flow(value: Any) -> str:
    """``value`` as it would be written in an override (YAML flow style): ``''``, ``[3, 4, 5]``, ``0.0005``."""
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def format_rows(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    """Aligned columns followed by each key's help line (``# ...``)."""
    from mmfl.config_help import help_for

    table = ([header] if header else []) + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        note = "help" if header and n == 0 else help_for(row[0])
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + f"  # {note}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A default as YAML can print it: a list of dataclasses (branches) as a count."""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return f"{len(value)} branch" + ("es" if len(value) > 1 else "")
    return value
