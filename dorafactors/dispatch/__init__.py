"""Configuration (environment variables, read once) and the rules that pick a Triton or PyTorch path."""

from . import config, rules

__all__ = ["config", "rules"]
