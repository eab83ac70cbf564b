"""Special functions numpy lacks: the error function, for the exact GELU.

``erf`` is a numba ufunc on the CPU (``math.erf`` compiled, cached on disk) and
cupyx's ``erf`` on the GPU. ``erf_reference`` is its plain, slow numpy twin.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module


@numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
def _erf_cpu(value):
    return math.erf(value)


def erf(array):
    """The error function, elementwise, on numpy or cupy arrays."""
    xp = array_module(array)
    if xp is np:
        return _erf_cpu(array)
    from cupyx.scipy.special import erf as erf_gpu

    return erf_gpu(array)


def erf_reference(array):
    """``math.erf`` applied element by element (the twin the tests compare with)."""
    flat = [math.erf(float(value)) for value in np.ravel(array)]
    return np.asarray(flat, dtype=np.asarray(array).dtype).reshape(np.shape(array))
