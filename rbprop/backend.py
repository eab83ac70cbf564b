"""Array backends: numpy on the CPU, cupy on a CUDA GPU when it is installed.

Every primitive computes on raw arrays through the module returned by
:func:`array_module`, so the same code serves both backends. cupy is imported
lazily and only if present; nothing here fails on a machine without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def cupy_module():
    """Return the cupy module, or None when cupy (or a CUDA device) is missing."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # noqa: BLE001 - any CUDA failure means "no usable GPU"
        return None
    return cupy


def gpu_available() -> bool:
    """True when cupy is importable and sees at least one CUDA device."""
    return cupy_module() is not None


def array_module(*arrays):
    """Return numpy or cupy, whichever owns the given arrays (numpy by default)."""
    cupy = cupy_module()
    if cupy is not None:
        for array in arrays:
            if isinstance(array, cupy.ndarray):
                return cupy
    return np


def is_array(value) -> bool:
    """True for a numpy or cupy ndarray."""
    if isinstance(value, np.ndarray):
        return True
    cupy = cupy_module()
    return cupy is not None and isinstance(value, cupy.ndarray)


def to_device(array, device: str):
    """Move an array to ``"cpu"`` (numpy) or ``"gpu"`` (cupy)."""
    if device == "cpu":
        cupy = cupy_module()
        if cupy is not None and isinstance(array, cupy.ndarray):
            return cupy.asnumpy(array)
        return np.asarray(array)
    if device == "gpu":
        cupy = cupy_module()
        if cupy is None:
            raise RuntimeError("device 'gpu' needs cupy and a CUDA device; neither was found")
        return cupy.asarray(array)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")


def to_numpy(array):
    """Return a numpy copy (or view) of a numpy or cupy array."""
    return to_device(array, "cpu")


def device_of(array) -> str:
    """``"gpu"`` for a cupy array, ``"cpu"`` otherwise."""
    return "cpu" if array_module(array) is np else "gpu"
