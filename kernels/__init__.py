"""Triton kernels of pwda_fast, installed as `pwda_fast.kernels` (pyproject.toml maps kernels/ here).

One module per op, named like the op in reference.py and ops.py; each module holds private Triton
kernels, then the launcher that ops.py calls. Importing this package does not import triton.
"""
