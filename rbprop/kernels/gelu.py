"""The exact (erf) GELU, forward and backward, fused into single passes.

    gelu(x)  = x Phi(x),   Phi(x) = (1 + erf(x / sqrt 2)) / 2
    gelu'(x) = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

numpy evaluates these as five to eight passes over the array with
temporaries, and ``erf`` (a compiled scalar ``math.erf``, see
:mod:`rbprop.kernels.special`) takes most of the time.
numba has no vectorised ``erf`` or ``exp`` on the CPU (no SVML), so for float32
arrays the kernels use a rational approximation of ``erf`` that LLVM does
vectorise, evaluated in float64:

    erf(z) ~ z P(z^2) / Q(z^2)  for |z| < 3.92,   sign(z) beyond,

with ``P`` of degree 6 and ``Q`` of degree 5 (``Q(0) = 1``), fitted by
linearised least squares with Sanathanan-Koerner reweighting on [0, 3.92]. Its
largest error is 3.4e-9 on that interval and 2.6e-8 (at the switch to +-1)
overall, below half a float32 ulp of 1 (3e-8); the test suite checks the bound
against ``math.erf``. float64 arrays keep ``math.erf`` (exact), fused. The
backward's ``exp`` goes through numpy's vectorised ``np.exp``, in place, between
two numba passes (as the softmax kernels do). Each function dispatches to
numba for float32/float64 numpy arrays and to its ``*_reference`` twin (the
plain numpy formulas with the exact ``erf``) otherwise.

On 819,200 float32 elements (a ViT MLP activation, one thread, loaded machine)
the forward took 1.0 ms against 12 ms for the numpy formulas and the backward
1.9 ms against 19 ms, with a largest error against float64 of 4.8e-7 (numpy's
float32 formulas: 6.8e-7); letting LLVM fuse multiplies and adds (below) brought
them to 0.6 and 1.5 ms. Given the forward's output, the backward reads
``Phi(x) = gelu(x) / x`` off it instead of evaluating erf again.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .dispatch import launch, use_numba
from .special import erf

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Below this |x|, Phi(x) = 1/2 + x phi(0) to within x^3 / 15 < 1e-19, and gelu(x) / x
# (from a rounded, possibly subnormal gelu(x)) would be the less accurate of the two.
_PHI_FROM_OUTPUT_MIN = 1e-6

# erf(z) ~ z P(z^2) / Q(z^2) on |z| < _ERF_EDGE (see the module docstring).
_ERF_EDGE = 3.92
_P0, _P1, _P2, _P3 = (
    1.1283791808991808,
    0.1846509109908682,
    0.05426052821478045,
    0.003828943404336212,
)
_P4, _P5, _P6 = 0.0003798430435310999, 4.704257652774469e-06, -1.3258705634304851e-08
_Q1, _Q2, _Q3 = 0.49697613835034643, 0.11374494665292628, 0.015422142125510652
_Q4, _Q5 = 0.0013036349437467224, 6.329327639658923e-05


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True, inline="always")
def _erf_rational(z):
    """The rational ``erf`` of the module docstring, in float64 (its conditionals are selects)."""
    inside = min(max(z, -_ERF_EDGE), _ERF_EDGE)
    t = inside * inside
    numerator = (((((_P6 * t + _P5) * t + _P4) * t + _P3) * t + _P2) * t + _P1) * t + _P0
    denominator = ((((_Q5 * t + _Q4) * t + _Q3) * t + _Q2) * t + _Q1) * t + 1.0
    value = inside * numerator / denominator
    # Beyond the edge erf is +-1 to within 3e-8: exactly, so that gelu(x) stays 0 (not
    # x * 1e-8) for very negative x.
    return value if abs(z) < _ERF_EDGE else (1.0 if z > 0 else -1.0)


@numba.njit(cache=True, inline="always")
def _phi_rational(value):
    """``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` with the rational erf (float32 inputs)."""
    return 0.5 * (1.0 + _erf_rational(value * _SQRT_HALF))


@numba.njit(cache=True, inline="always")
def _phi_exact(value):
    """``Phi(x)`` with ``math.erf`` (float64 inputs)."""
    return 0.5 * (1.0 + math.erf(value * _SQRT_HALF))


# LLVM may fuse a multiply and an add into one FMA (more accurate, not less): the
# polynomials of the rational erf then take half the instructions. On 819,200
# float32 elements the forward took 0.60 ms instead of 0.88 ms and the backward's
# last pass 0.74 instead of 1.09; 42 of the outputs moved by one float32 ulp.
_FUSED_MULTIPLY_ADD = {"contract"}

# One kernel per erf rather than a flag: a branch inside the loop, even on a
# loop-invariant flag, kept LLVM from vectorising the rational one (4.7 ms
# against 0.8 ms on 819,200 float32 elements).


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _gelu_rational_numba(x, y):
    for i in numba.prange(x.size):
        value = np.float64(x[i])
        y[i] = value * _phi_rational(value)


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _gelu_exact_numba(x, y):
    for i in numba.prange(x.size):
        value = x[i]
        y[i] = value * _phi_exact(value)


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _half_square_numba(x, out):
    """``out = -x^2 / 2``: the exponent of phi, for np.exp to take in place."""
    for i in numba.prange(x.size):
        value = x[i]
        out[i] = -0.5 * value * value


# Both backward kernels overwrite exponentials = exp(-x^2/2) with
# v * (Phi(x) + x exp(-x^2/2) / sqrt(2 pi)).


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _gelu_backward_rational_numba(cotangent, x, exponentials):
    for i in numba.prange(x.size):
        value = np.float64(x[i])
        derivative = _phi_rational(value) + value * exponentials[i] * _INV_SQRT_2PI
        exponentials[i] = cotangent[i] * derivative


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _gelu_backward_exact_numba(cotangent, x, exponentials):
    for i in numba.prange(x.size):
        value = x[i]
        derivative = _phi_exact(value) + value * exponentials[i] * _INV_SQRT_2PI
        exponentials[i] = cotangent[i] * derivative


@numba.njit(cache=True, inline="always")
def _phi_from_output(value, output):
    """``Phi(x) = gelu(x) / x``; near 0, where the ratio loses digits, ``1/2 + x phi(0)``."""
    if abs(value) > _PHI_FROM_OUTPUT_MIN:
        return output / value
    return 0.5 + value * _INV_SQRT_2PI


@numba.njit(cache=True, parallel=True, fastmath=_FUSED_MULTIPLY_ADD)
def _gelu_backward_from_output_numba(cotangent, x, output, exponentials):
    """The backward with ``Phi`` read off the forward's output: no erf, one division."""
    for i in numba.prange(x.size):
        value = np.float64(x[i])
        cdf = _phi_from_output(value, np.float64(output[i]))
        exponentials[i] = cotangent[i] * (cdf + value * exponentials[i] * _INV_SQRT_2PI)


# The rational erf serves float32, whose rounding hides its error; float64 keeps math.erf.
_FORWARD = {np.dtype(np.float32): _gelu_rational_numba, np.dtype(np.float64): _gelu_exact_numba}
_BACKWARD = {
    np.dtype(np.float32): _gelu_backward_rational_numba,
    np.dtype(np.float64): _gelu_backward_exact_numba,
}


# ----------------------------------------------------------------------------- numpy twins


def gelu_reference(x):
    """numpy twin of :func:`gelu`: ``x Phi(x)`` with the exact erf."""
    return (0.5 * x * (1 + erf(x * x.dtype.type(_SQRT_HALF)))).astype(x.dtype, copy=False)


def gelu_backward_reference(cotangent, x, output=None):
    """numpy twin of :func:`gelu_backward`."""
    _check(cotangent, x, output)
    xp = array_module(x)
    if output is None:
        cdf = 0.5 * (1 + erf(x * x.dtype.type(_SQRT_HALF)))
    else:
        small = xp.abs(x) <= _PHI_FROM_OUTPUT_MIN
        ratio = output / xp.where(small, 1, x)
        cdf = xp.where(small, 0.5 + x * x.dtype.type(_INV_SQRT_2PI), ratio)
    pdf = xp.exp(-0.5 * x * x) * x.dtype.type(_INV_SQRT_2PI)
    return (cotangent * (cdf + x * pdf)).astype(cotangent.dtype, copy=False)


def _check(cotangent, x, output=None):
    for label, array in (("cotangent", cotangent), ("output", output)):
        if array is not None and array.shape != x.shape:
            raise ShapeError(
                f"gelu_backward: {label} of shape {array.shape} does not match the input "
                f"of shape {x.shape}"
            )


# ----------------------------------------------------------------------------- dispatchers


def gelu(x):
    """``x Phi(x)``, elementwise (float32 through the rational erf, float64 exact)."""
    if not use_numba(x):
        return gelu_reference(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    y = np.empty(flat.shape, dtype=x.dtype)
    launch(_FORWARD[x.dtype], flat.size, flat, y)
    return y.reshape(x.shape)


def gelu_backward(cotangent, x, output=None):
    """``v * gelu'(x)``, elementwise.

    ``output``, the forward's ``gelu(x)`` where the caller kept it, gives
    ``Phi(x) = gelu(x) / x`` without evaluating erf again: the float32 backward
    then took 1.2 ms instead of 1.75 ms on 819,200 elements (one thread), its
    largest error against float64 1.1e-7 instead of 0.85e-7.
    """
    arrays = (cotangent, x) + (() if output is None else (output,))
    if not use_numba(*arrays):
        return gelu_backward_reference(cotangent, x, output)
    _check(cotangent, x, output)
    flat = np.ascontiguousarray(x).reshape(-1)
    exponentials = np.empty(flat.shape, dtype=x.dtype)
    launch(_half_square_numba, flat.size, flat, exponentials)
    np.exp(exponentials, out=exponentials)
    cotangent = np.ascontiguousarray(cotangent).reshape(-1)
    if output is None:
        launch(_BACKWARD[x.dtype], flat.size, cotangent, flat, exponentials)
    else:
        output = np.ascontiguousarray(output).reshape(-1)
        launch(_gelu_backward_from_output_numba, flat.size, cotangent, flat, output, exponentials)
    return exponentials.reshape(x.shape)
