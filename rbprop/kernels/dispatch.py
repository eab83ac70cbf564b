"""Choosing between a compiled numba kernel and its plain numpy twin.

Every kernel in this package comes as a pair: a numba function that runs on
numpy arrays in float32 or float64, and a vectorised ``*_reference`` twin that
runs on numpy or cupy arrays of any dtype. :func:`use_numba` decides which one a
call gets. Setting ``RBPROP_DISABLE_NUMBA=1`` in the environment sends every
call to the twins (to compare timings or to rule a kernel out when debugging);
it is read at each call, so tests may toggle it.

Threads. The kernels are compiled with ``parallel=True`` but, by default, run
on the calling thread only; ``RBPROP_KERNEL_THREADS=N`` (read at each call)
lets :func:`launch` use up to ``N`` of numba's threads for kernels with at
least :data:`PARALLEL_MIN_WORK` elements of work. One thread is the default
because a fork-join loop is only as fast as its slowest thread, and on a
machine whose cores are busy (other processes, or OpenBLAS's own threads,
which spin for a long while after each product) the second thread waits for
a scheduler time slice at every kernel call. Measured on a 2-core machine
under a load average of 3.5 to 6, seconds per exact training step (batch 128):

====================================  ==========  ==========
numba threads, OpenBLAS threads        BagNet      ViT
====================================  ==========  ==========
2, 2 (numba's default spinning wait)   0.33        2.9
2, 2 (``OMP_WAIT_POLICY=PASSIVE``)     0.11        2.0
1, 2                                   0.075       0.18
2, 1 (passive)                         0.033       0.21
1, 1                                   0.033       0.20
====================================  ==========  ==========

Two kernel threads never helped there, and with two BLAS threads they cost
ten times over. Where the cores are free, raising the thread count may pay
for the larger kernels; measure first.

Waiting policy. numba's default (OpenMP) threading layer lets idle worker
threads spin, so that on a loaded machine each parallel kernel call took
about 8 ms whatever its size (0.2 to 25 ms of work on one thread); with
``OMP_WAIT_POLICY=PASSIVE`` the workers sleep and the same calls took what one
thread takes. Importing this module therefore sets ``OMP_WAIT_POLICY=PASSIVE``
unless the environment already sets it (it must be set before numba starts its
thread pool). The ``workqueue`` layer measured like the passive one but aborts
the process when two Python threads launch kernels at once, so it is not used.

Freed memory. A training step allocates its activations (tens to hundreds
of megabytes, in arrays of a few megabytes) in the forward pass and frees
them in the backward pass. glibc's malloc returns the top of its heap to the
operating system whenever more than twice its adaptive mmap threshold (a few
megabytes) lies free there, and the next forward pass then takes a page
fault for every fresh 4 KiB page; whether that happens depends on which
allocation lands last in the heap, so it changed from one version of the code
to the next. On the 2-core machine above, an exact ViT step (batch 128, one
BLAS thread) took 13,000 to 15,000 page faults and 147 ms with glibc's
defaults, and no faults and 124 ms with the thresholds :func:`keep_freed_memory` sets.
It changes the whole process, so importing rbprop does not call it: the
``rbprop`` command and the benchmarks do, and a training loop of your own can
call it once. ``RBPROP_KEEP_FREED_MEMORY=0`` turns it off, and glibc's own
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` win where set. The
price: a process keeps the peak of its heap (up to half a gigabyte of it free)
instead of handing it back.
"""

from __future__ import annotations

import ctypes
import os
import platform

import numba
import numpy as np

# Elements of work below which a kernel runs on one thread even where more are
# allowed: a parallel loop's start-up (microseconds, idle) would cost more than
# a second core saves.
PARALLEL_MIN_WORK = 1 << 16

NUMBA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Before any kernel runs (see the module docstring); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets:
# arrays up to 32 MiB (glibc's largest mmap threshold) come from the heap, and
# the heap is trimmed only when half a gigabyte lies free at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the OS.

    Fixes the mmap and trim thresholds (see the module docstring). Returns
    whether they were set: not where the C library is not glibc, nor where
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` are set (those win),
    nor where ``RBPROP_KEEP_FREED_MEMORY`` is ``0``.
    """
    if os.environ.get("RBPROP_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


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


def kernel_threads() -> int:
    """Threads a large kernel may use: ``RBPROP_KERNEL_THREADS`` (default 1), capped at numba's."""
    text = os.environ.get("RBPROP_KERNEL_THREADS", "").strip()
    if not text:
        return 1
    try:
        threads = int(text)
    except ValueError:
        raise ValueError(
            f"RBPROP_KERNEL_THREADS must be a positive integer, got {text!r}"
        ) from None
    if threads < 1:
        raise ValueError(f"RBPROP_KERNEL_THREADS must be a positive integer, got {text!r}")
    return min(threads, numba.config.NUMBA_NUM_THREADS)


def launch(kernel, work: int, *arguments):
    """Call the compiled ``kernel`` on :func:`kernel_threads` threads (one for small ``work``)."""
    threads = kernel_threads() if work >= PARALLEL_MIN_WORK else 1
    previous = numba.get_num_threads()
    if previous == threads:
        return kernel(*arguments)
    numba.set_num_threads(threads)
    try:
        return kernel(*arguments)
    finally:
        numba.set_num_threads(previous)


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
        raise index_range_error(kernel_name, argument, indices, size)
    return indices


def index_range_error(kernel_name: str, argument: str, indices, size: int, where: str = ""):
    """The IndexError for ``indices`` not all in ``[0, size)``, naming the values found.

    ``where`` adds what the indices point into (" for a mask of shape (5, 3)").
    """
    return IndexError(
        f"{kernel_name}: {argument} must lie in [0, {size}){where}, "
        f"got values from {int(indices.min())} to {int(indices.max())}"
    )


def add_at(xp, target, index, values):
    """``target[index] += values`` with repeated indices accumulated, on numpy or cupy."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)
    return target
