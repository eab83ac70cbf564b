"""Compiled kernels (numba on the CPU), each next to the plain numpy twin it must match."""
