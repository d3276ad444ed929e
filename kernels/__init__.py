"""Numba kernels for the routed experts: int4 storage and the decode / prefill expert MLPs.

Pure functions over NumPy arrays; nothing here imports torch or `offload`.
"""
