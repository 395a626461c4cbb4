"""``llamakin`` command line.

Every user error is one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import LlamakinError


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, 28 + 34 * (len(header) - 1))).print(table)


def _config_of(spec: str):
    """A checkpoint path, or the name of a reference checkpoint."""
    from .checkpoint import read_checkpoint_config
    from .checkpoint import checkpoint_dir
    from .reference import reference_config

    if Path(spec).expanduser().exists():
        _, config = read_checkpoint_config(checkpoint_dir(spec))
        return config, spec
    config, description = reference_config(spec)
    return config, f"{spec} ({description})"


def cmd_inspect(args) -> None:
    from .architecture import card

    _, rows = card(args.path)
    _table(f"llamakin inspect {args.path}", ["", "value"], [list(r) for r in rows])


def cmd_arch_diff(args) -> None:
    from .architecture import describe

    configs = [_config_of(s) for s in args.models]
    described = [describe(c) for c, _ in configs]
    keys = list(described[0])
    rows = []
    for key in keys:
        values = [d[key] for d in described]
        if args.all or len(set(values)) > 1:
            rows.append([key, *values])
    if not rows:
        print("no architectural differences")
        return
    _table("architectural differences" + ("" if not args.all else " (all rows)"), ["", *[n for _, n in configs]], rows)


def cmd_convert(args) -> None:
    from .convert import convert_checkpoint

    destination, family = convert_checkpoint(args.source, args.destination, to=args.to,
                                             rope_layout=args.rope_layout, dtype=args.dtype)
    print(f"wrote {family} checkpoint to {destination}")


def build_parser() -> argparse.ArgumentParser:
    from .families import FAMILIES

    parser = argparse.ArgumentParser(prog="llamakin", description="The LLaMA family and its kin in one readable PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture card of a checkpoint (no weights are read)")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("arch-diff", help="side-by-side architectural differences of checkpoints or reference names")
    p.add_argument("models", nargs="+", metavar="PATH_OR_NAME")
    p.add_argument("--all", action="store_true", help="show every row, not only the rows that differ")
    p.set_defaults(func=cmd_arch_diff)

    p = sub.add_parser("convert", help="convert a checkpoint between formats, RoPE layouts and dtypes")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--to", choices=sorted(FAMILIES), help="output format (default: the source's, if it can express the result)")
    p.add_argument("--rope-layout", choices=["half", "interleaved"],
                   help="reorder q/k rows (weights and biases) for this RoPE layout: half = HF rotate_half, "
                        "interleaved = Meta/GPT-J pairs")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the source's)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LlamakinError as e:
        print(f"llamakin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
