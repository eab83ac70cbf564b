"""Choosing between a compiled numba kernel and its plain numpy twin.

Every kernel in this package comes as a pair: a numba function that runs on
numpy arrays in float32 or float64, and a vectorised ``*_reference`` twin that
runs on numpy or cupy arrays of any dtype. :func:`use_numba` decides which one a
call gets. Setting ``RBPROP_DISABLE_NUMBA=1`` in the environment sends every
call to the twins (to compare timings or to rule a kernel out when debugging);
it is read at each call, so tests may toggle it.

The kernels are compiled with ``parallel=True``. Waking the worker threads of
a parallel loop costs microseconds on an idle machine and far more on a busy
one, so :func:`launch` runs kernels with less than :data:`PARALLEL_MIN_WORK`
elements of work on the calling thread alone. ``NUMBA_NUM_THREADS=1`` keeps
every kernel on one thread. With numba's OpenMP threading layer, threads that
wait by spinning (OpenMP's default) can lose whole scheduler time slices, about
ten milliseconds per parallel loop, when other processes or threads compete
for the cores; ``OMP_WAIT_POLICY=PASSIVE`` (or ``NUMBA_THREADING_LAYER=workqueue``)
set before the first kernel runs avoids that.
"""

from __future__ import annotations

import os

import numba
import numpy as np

# Elements of work below which a kernel runs on one thread: a parallel loop's
# start-up (a few microseconds, idle) would cost more than the second core saves.
PARALLEL_MIN_WORK = 1 << 16

NUMBA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def numba_disabled() -> bool:
    """True when the environment asks for the numpy twins (``RBPROP_DISABLE_NUMBA=1``)."""
    return os.environ.get("RBPROP_DISABLE_NUMBA", "").strip().lower() in ("1", "true", "yes")


def use_numba(*arrays) -> bool:
    """Whether the numba kernel can serve these floating-point arrays.

    It can when numba is not disabled and every array is a numpy array of one
    dtype, float32 or float64; cupy arrays and other dtypes go to the twin.
    """
    if numba_disabled():
        return False
    dtype = None
    for array in arrays:
        if type(array) is not np.ndarray or array.dtype not in NUMBA_DTYPES:
            return False
        if dtype is not None and array.dtype != dtype:
            return False
        dtype = array.dtype
    return True


def launch(kernel, work: int, *arguments):
    """Call the compiled ``kernel``, on one thread when ``work`` (elements) is small."""
    if work >= PARALLEL_MIN_WORK:
        return kernel(*arguments)
    threads = numba.get_num_threads()
    if threads == 1:
        return kernel(*arguments)
    numba.set_num_threads(1)
    try:
        return kernel(*arguments)
    finally:
        numba.set_num_threads(threads)


def as_pair(kernel_name: str, argument: str, value) -> tuple[int, int]:
    """An int or a pair of ints as ``(rows, columns)``, or an error naming the kernel."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(
            f"{kernel_name}: {argument} must be an int or a pair of ints, got {value!r}"
        ) from None
    for item in (first, second):
        if not isinstance(item, (int, np.integer)) or isinstance(item, bool):
            raise TypeError(
                f"{kernel_name}: {argument} must be an int or a pair of ints, got {value!r}"
            )
    return int(first), int(second)


def as_indices(kernel_name: str, argument: str, indices, size: int, xp=np):
    """``indices`` as a 1-D int64 array on ``xp``, checked to lie in ``[0, size)``.

    The compiled kernels do not check bounds, so a bad index is caught here and
    named instead of reading or writing outside an array.
    """
    indices = xp.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"{kernel_name}: {argument} must be 1-D, got shape {indices.shape}")
    if indices.size and indices.dtype.kind not in "iu":
        raise TypeError(f"{kernel_name}: {argument} must be integers, got dtype {indices.dtype}")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise IndexError(
            f"{kernel_name}: {argument} must lie in [0, {size}), "
            f"got values from {int(indices.min())} to {int(indices.max())}"
        )
    return indices


def add_at(xp, target, index, values):
    """``target[index] += values`` with repeated indices accumulated, on numpy or cupy."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)
    return target
