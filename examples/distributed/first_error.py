"""Print the error a failed run died of, from its log: the worker's exception, not torchrun's banner.

    python examples/distributed/first_error.py RUN.log            # the exception and the frame it came from
    python examples/distributed/first_error.py RUN.log --one-line # just ``Type: message`` (for status JSON)

torchrun ends a failed job with its own traceback (``ChildFailedError``) and a "Root Cause" banner that
says only "exitcode: 1"; the worker's traceback is further up, possibly with ``[rankN]:`` prefixes and
interleaved with the other ranks' output. This finds the first Python traceback that is not torchrun's,
and prints its last frame and exception line. Without one it falls back to the last line that names an
error, then to the last non-empty line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_RANK_PREFIX = re.compile(r"^\[(?:default)?(?:rank)?(\d+)\]:\s?")
_LAUNCHER = ("torch.distributed.elastic", "ChildFailedError")
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _strip(line: str) -> tuple[str | None, str]:
    match = _RANK_PREFIX.match(line)
    return (match.group(1), line[match.end() :]) if match else (None, line)


def tracebacks(lines: list[str]) -> list[dict]:
    """Every ``Traceback (most recent call last):`` block: rank, frames (``File ...`` + code) and exception."""
    found, open_blocks = [], {}
    for raw in lines:
        rank, line = _strip(raw.rstrip("\n"))
        if line.startswith("Traceback (most recent call last):"):
            open_blocks[rank] = {"rank": rank, "frames": [], "exception": None}
            continue
        block = open_blocks.get(rank)
        if block is None:
            continue
        if line.startswith((" ", "\t")):
            if line.strip().startswith("File "):
                block["frames"].append([line.strip()])
            elif block["frames"] and not set(line.strip()) <= set("^~ "):
                block["frames"][-1].append(line.strip())
            continue
        if not line.strip():
            continue
        if line.startswith(("During handling", "The above exception")):
            continue
        block["exception"] = line.strip()
        found.append(open_blocks.pop(rank))
    return found


def first_error(text: str) -> dict:
    """``{"exception", "frame", "rank"}`` of the failure (frame and rank may be None)."""
    lines = text.splitlines()
    for block in tracebacks(lines):
        frames = [" | ".join(frame) for frame in block["frames"]]
        if any(marker in block["exception"] for marker in _LAUNCHER):
            continue
        if any("torch/distributed/elastic" in frame or "torch/distributed/run.py" in frame for frame in frames[-1:]):
            continue
        return {"exception": block["exception"], "frame": frames[-1] if frames else None, "rank": block["rank"]}
    for raw in reversed(lines):
        _, line = _strip(raw.strip())
        if _ERROR_LINE.match(line) and not any(marker in line for marker in _LAUNCHER):
            return {"exception": line, "frame": None, "rank": None}
    last = next((raw.strip() for raw in reversed(lines) if raw.strip()), "(empty log)")
    return {"exception": last, "frame": None, "rank": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("--one-line", action="store_true")
    args = parser.parse_args(argv)
    error = first_error(args.log.read_text(errors="replace"))
    rank = f"rank {error['rank']}: " if error["rank"] is not None else ""
    if args.one_line:
        print(f"{rank}{error['exception']}")
    else:
        if error["frame"]:
            print(error["frame"])
        print(f"{rank}{error['exception']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
