"""Triton kernels, one module per op, each with a plain PyTorch reference beside it.

Importing this package does not import Triton; the kernel modules do, on first use.
"""
