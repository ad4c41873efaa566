"""The benchmark suites: each module exposes ``cases(settings) -> list[Case]``."""

from __future__ import annotations

from ..harness import SUITE_ORDER, Case, Settings

__all__ = ["SUITE_ORDER", "build_cases", "parse_suites"]


def parse_suites(text: str) -> list[str]:
    """``all`` or a comma-separated list of suite names, returned in run order."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or "all" in names:
        return list(SUITE_ORDER)
    unknown = [n for n in names if n not in SUITE_ORDER]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from all, {', '.join(SUITE_ORDER)}")
    return [s for s in SUITE_ORDER if s in names]


def build_cases(suites: list[str], settings: Settings) -> list[Case]:
    from . import compose, decode, layer, model, norm, ranks

    modules = {"compose": compose, "norm": norm, "layer": layer, "model": model, "decode": decode, "ranks": ranks}
    out: list[Case] = []
    for name in suites:
        out.extend(modules[name].cases(settings))
    return out
