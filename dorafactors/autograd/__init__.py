"""Autograd glue between the kernels and PyTorch (custom Functions, torch.library ops)."""

from .compose import dora_compose

__all__ = ["dora_compose"]
