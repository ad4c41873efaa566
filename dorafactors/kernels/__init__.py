"""Triton kernels, one op per group of modules, each with a plain PyTorch reference beside it.

* the factored row norm: ``row_norm.py`` (host entry points), ``row_norm_kernel.py`` (``@triton.jit``),
  ``row_norm_plan.py`` (launch configuration), ``row_norm_reference.py`` (PyTorch reference);
* the DoRA composition: ``compose.py`` (host entry points), ``compose_kernel.py`` (``@triton.jit``),
  ``compose_launch.py`` (autotuning, launches), ``compose_reference.py`` (PyTorch reference);
* ``operands.py`` (dtypes and operand checks, shared with ``dispatch``), ``_triton_utils.py`` (SM count,
  ticket buffers, interpreter detection).

Importing this package does not import Triton, nor do ``operands.py`` and the references; the kernel
modules do, on first use.
"""
