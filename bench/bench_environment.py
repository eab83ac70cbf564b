"""What the benchmarks ran on, and how many threads they ran with.

Wall-clock figures depend on the machine, the library versions and above all
on the BLAS thread count, so every benchmark reports :func:`describe` next to
its figures. :func:`pin_threads` sets one thread count for every pool in the
process: numpy's BLAS, PyTorch's intra-op pool and the OpenMP runtimes.

A BLAS library reads ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` once, when
it is loaded; later changes need ``threadpoolctl``. Without it, and with numpy
already imported, the only way to change the count is to start the process
again with the variables set, which :func:`pin_threads` does for a script
(``reexec=True``).

Importing this module also applies rbprop's allocator setting
(:func:`rbprop.kernels.dispatch.keep_freed_memory`), as ``rbprop train`` does,
so that a step does not page-fault its activations in again; PyTorch, timed in
the same process, runs under it too. :func:`describe` records whether it took.

OpenMP runtimes. PyTorch's CPU wheels ship their own ``libgomp.so.1``; numba's
OpenMP threading layer (rbprop's parallel kernels) loads the system's, under the
same name, when its first parallel kernel runs. The dynamic linker then serves
both from whichever was loaded first. With the system's first, PyTorch's CPU
flash attention ran some 60 times slower in the same process: a ViT training
step (batch 128, 2 threads) took 2.3 s against 0.08 s in a process of its own.
:func:`load_torch_first` imports PyTorch before any rbprop kernel runs, which
gives PyTorch its own runtime (0.09 s); rbprop's step time did not change
measurably (0.064 against 0.070 s, within the run-to-run noise).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

from rbprop.kernels.dispatch import keep_freed_memory

#: Variables that BLAS and OpenMP runtimes read when they are loaded.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: Variables worth recording: thread counts, OpenMP waiting, rbprop's kernel threads.
REPORTED_VARIABLES = THREAD_VARIABLES + (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OMP_WAIT_POLICY",
    "RBPROP_KERNEL_THREADS",
    "RBPROP_DISABLE_NUMBA",
    "RBPROP_KEEP_FREED_MEMORY",
)

TORCH_INSTALL_HINT = (
    "pip install torch==2.13.0 (from PyPI add --index-url https://download.pytorch.org/whl/cpu "
    "for the CPU build)"
)

#: Whether glibc keeps freed memory for reuse in this process (see the docstring).
FREED_MEMORY_KEPT = keep_freed_memory()

# Kept alive for the whole process: threadpoolctl restores the old limits when
# its controller object is garbage collected.
_limits = []


def _threadpool_info():
    """threadpoolctl's description of the loaded thread pools, or None without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process: name, version, threads, the processor
    kernels they picked (OpenBLAS's ``architecture``, which ``OPENBLAS_CORETYPE`` can force)
    and the package that ships them."""
    info = _threadpool_info()
    if info is None:
        return []
    return [
        {
            "name": pool["internal_api"],
            "version": pool.get("version"),
            "threads": pool["num_threads"],
            "architecture": pool.get("architecture"),
            "package": _owning_package(pool.get("filepath", "")),
        }
        for pool in info
        if pool["user_api"] == "blas"
    ]


def _owning_package(filepath: str) -> str:
    """``numpy`` for ``.../site-packages/numpy.libs/libopenblas.so`` and the like."""
    for part in reversed(filepath.replace("\\", "/").split("/")[:-1]):
        if part not in ("lib", "lib64", ".libs"):
            return part.removesuffix(".libs")
    return "?"


def blas_threads() -> int | None:
    """Threads numpy's BLAS uses now (threadpoolctl), else the environment's setting, else None."""
    libraries = blas_libraries()
    if libraries:
        numpy_ones = [lib["threads"] for lib in libraries if lib["package"] == "numpy"]
        return max(numpy_ones or [lib["threads"] for lib in libraries])
    for name in THREAD_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def load_torch_first() -> bool:
    """Import PyTorch, where installed, before numba starts OpenMP (see the module docstring).

    Call it before any rbprop kernel runs. Returns whether PyTorch is now loaded.
    """
    if torch_version() is None:
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_version() -> str | None:
    """PyTorch's version, or None where it is not installed (it is optional); no import."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def pin_threads(threads: int, reexec: bool = False) -> None:
    """Use ``threads`` threads in every BLAS, OpenMP and PyTorch pool of this process.

    Libraries loaded later read the environment variables set here; loaded
    ones are limited through threadpoolctl. Without threadpoolctl, once numpy
    is imported, a script restarts itself with the variables set
    (``reexec=True``); otherwise this raises, saying what to do.
    """
    if threads < 1:
        raise ValueError(f"pin_threads: threads must be at least 1, got {threads}")
    already_set = all(os.environ.get(name) == str(threads) for name in THREAD_VARIABLES)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if "numpy" in sys.modules and not already_set:
            if not reexec:
                raise RuntimeError(
                    "pin_threads: numpy is already loaded and threadpoolctl is not installed; "
                    f"pip install threadpoolctl, or set OPENBLAS_NUM_THREADS={threads} "
                    "before starting Python"
                ) from None
            # The BLAS read its thread count when numpy loaded it: start again with the
            # variables in place (they are set now, so the new process does not loop).
            os.execv(sys.executable, [sys.executable, *sys.argv])
    else:
        _limits.append(threadpool_limits(limits=threads))

    # A PyTorch imported later reads OMP_NUM_THREADS; one already imported is told.
    if sys.modules.get("torch") is not None:
        sys.modules["torch"].set_num_threads(threads)


def describe(threads: int | None = None) -> dict:
    """Versions, CPUs, thread counts, BLAS libraries and thread-related variables."""
    import numba
    import numpy as np

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads if threads is not None else blas_threads(),
        "blas": blas_libraries() or "unknown (threadpoolctl is not installed)",
        "load_average": None if load is None else [round(value, 2) for value in load],
        "variables": {name: os.environ.get(name) for name in REPORTED_VARIABLES},
        "freed_memory_kept": FREED_MEMORY_KEPT,
    }


def describe_markdown(environment: dict) -> str:
    """:func:`describe`'s dict as markdown bullet points."""
    blas = environment["blas"]
    if isinstance(blas, list):
        blas = ", ".join(
            f"{lib['name']} {lib['version']} ({lib['package']}, {lib['threads']} thread(s)"
            + (f", {lib['architecture']} kernels" if lib.get("architecture") else "")
            + ")"
            for lib in blas
        )
    variables = ", ".join(
        f"{name}={value}" for name, value in environment["variables"].items() if value is not None
    )
    return "\n".join(
        [
            f"- python {environment['python']}, numpy {environment['numpy']}, "
            f"numba {environment['numba']}, torch {environment['torch'] or 'not installed'}",
            f"- {environment['cpus']} CPUs ({environment['machine']}), "
            f"{environment['threads']} thread(s) for BLAS"
            + (" and PyTorch" if environment["torch"] else ""),
            f"- BLAS: {blas}",
            f"- load average at start: {environment['load_average']}",
            f"- environment: {variables or 'no thread variables set'}",
            "- glibc keeps freed memory for reuse (rbprop's allocator setting): "
            + ("yes" if environment.get("freed_memory_kept") else "no"),
        ]
    )
