"""The ``python -m dorafactors`` command line: arguments in, the report printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .model import DTYPES, TINY_MODEL
from .reporting import format_report, report


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report for the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dorafactors",
        description="Versions, settings and the path each DoRA layer takes: paste the output into bug reports.",
    )
    parser.add_argument(
        "--model",
        default=TINY_MODEL,
        help="'tiny' (default, built in), a Hugging Face model id or local folder (only its config is read), "
        "or a PEFT adapter folder",
    )
    parser.add_argument("--no-model", action="store_true", help="versions and settings only")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="base weight dtype")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-modules", default=None, help="comma-separated names, or all-linear")
    parser.add_argument("--device", default=None, help="device the decisions are for (default: cuda if available)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per prefill / training call")
    parser.add_argument("--decode-tokens", type=int, default=1, help="tokens per decode call")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    info = report(
        None if args.no_model else args.model,
        device=args.device,
        dtype=args.dtype,
        rank=args.rank,
        target_modules=args.target_modules,
        tokens=args.tokens,
        decode_tokens=args.decode_tokens,
    )
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(info))
    return 0
