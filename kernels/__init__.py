"""Triton kernels of tokentrim, installed as ``tokentrim.kernels``.

One module per fused op: the ``@triton.jit`` kernel(s) and a thin launcher that validates inputs,
allocates outputs and picks the grid. Depends on torch and triton only (never on ``tokentrim``).
Import the op modules lazily: importing this package does not import triton.
"""
