"""Convolution and pooling over NCHW images: ``conv2d``, ``max_pool2d``, ``avg_pool2d``.

``conv2d`` is lowered to one matrix product. :func:`im2col` turns the input
``x`` of shape ``(N, C, H, W)`` into ``cols`` of shape ``(N*OH*OW, C*kh*kw)``
(one row per output position, ordered ``(n, oh, ow)``; one column per weight
entry, ordered ``(c, i, j)``), so that with ``Wm = weight.reshape(O, C*kh*kw)``
and ``V`` the cotangent laid out as ``(N*OH*OW, O)``::

    Y = cols Wm^T,      dW = V^T cols,      dX = col2im(V Wm).

The product is taken as ``Y^T = Wm cols^T``, whose memory is the output laid
out channel-major: an (N, O, OH, OW) array with (O, N, OH, OW) strides, which
the ops after it keep (see :class:`Conv2d`, "Layout").

:func:`col2im` is the adjoint of :func:`im2col`: it adds each row back into
the window it was read from. Both, and their kept-rows variants, are the
compiled kernels of :mod:`rbprop.kernels.conv` (numpy twins on cupy); so are
the pooling loops (:mod:`rbprop.kernels.pool`).

Sampled VJPs of ``conv2d`` (see :class:`Conv2d`) sketch either the rows of the
lowered problem (``"contracted"``, spatial position x batch, the default) or
the output channels (``"cotangent"``). Pooling is row-local along the batch
axis and inherits the kept-rows evaluation of :class:`~rbprop.primitive.Primitive`.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..kernels import conv as conv_kernels
from ..kernels import pool as pool_kernels
from ..kernels.products import rows_product
from ..primitive import Primitive, ShapeError
from ..tensor import Tensor, as_tensor, record
from .linalg import ROW_PLACEMENTS, _sum_rows

# -- lowering ------------------------------------------------------------------


def pad_images(x, padding, value=0.0):
    """``x`` (N, C, H, W) padded by ``padding = (ph, pw)`` on both sides of H and W."""
    pad_h, pad_w = padding
    if not pad_h and not pad_w:
        return x
    xp = array_module(x)
    widths = ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w))
    return xp.pad(x, widths, mode="constant", constant_values=value)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a sliding window: ``floor((size + 2 p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def sliding_windows(padded, kh, kw, stride):
    """A strided view ``(N, C, OH, OW, kh, kw)`` of every window of ``padded`` (no copy)."""
    xp = array_module(padded)
    batch, channels, height, width = padded.shape
    stride_h, stride_w = stride
    out_h = (height - kh) // stride_h + 1
    out_w = (width - kw) // stride_w + 1
    step_n, step_c, step_h, step_w = padded.strides
    return xp.lib.stride_tricks.as_strided(
        padded,
        shape=(batch, channels, out_h, out_w, kh, kw),
        strides=(step_n, step_c, step_h * stride_h, step_w * stride_w, step_h, step_w),
    )


def channel_major(images):
    """``images`` (N, C, H, W) laid out channel-major: ``(C, N, H, W)`` in memory order.

    The array itself when it is laid out so already (a transposed view of a
    C-contiguous (C, N, H, W) array), otherwise a transposed copy.
    """
    xp = array_module(images)
    return xp.ascontiguousarray(images.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def channel_rows(images):
    """``images`` (N, C, H, W) as the (C, N*H*W) matrix of its channels (no copy when
    channel-major; see :func:`channel_major`)."""
    xp = array_module(images)
    channels = images.shape[1]
    return xp.ascontiguousarray(images.transpose(1, 0, 2, 3)).reshape(channels, -1)


def is_channel_major(images) -> bool:
    """Whether ``images`` (N, C, H, W) is laid out channel-major (see :func:`channel_major`)."""
    return images.transpose(1, 0, 2, 3).flags.c_contiguous


def im2col(x, kh, kw, stride, padding, rows=None):
    """Lower ``x`` (N, C, H, W) to ``cols`` (N*OH*OW, C*kh*kw), one row per output position.

    ``rows`` (flat indices into the ``N*OH*OW`` positions) lowers only those
    rows, in that order: what a sampled VJP reads, without building all of
    ``cols``.
    """
    if rows is None:
        return conv_kernels.im2col(x, kh, kw, stride, padding)
    return conv_kernels.im2col_rows(x, rows, kh, kw, stride, padding)


def col2im(cols, input_shape, kh, kw, stride, padding, rows=None):
    """The adjoint of :func:`im2col`: add each row of ``cols`` back into its window.

    ``cols`` has shape (N*OH*OW, C*kh*kw), or (len(rows), C*kh*kw) when ``rows``
    (distinct flat output positions) says which rows it holds; the others are
    zero and are never formed. The result has ``input_shape``.
    """
    input_shape = tuple(input_shape)
    if rows is None:
        return conv_kernels.col2im(cols, input_shape, kh, kw, stride, padding)
    return conv_kernels.col2im_rows(cols, rows, input_shape, kh, kw, stride, padding)


# -- argument checks -------------------------------------------------------------


def _pair(op_name: str, argument: str, value, minimum: int) -> tuple:
    """An int or a pair of ints as a pair, each at least ``minimum``."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    valid = len(pair) == 2 and all(
        isinstance(entry, (int, np.integer)) and not isinstance(entry, bool) for entry in pair
    )
    if not valid or min(pair) < minimum:
        raise ValueError(
            f"{op_name}: {argument} must be an int or a pair of ints >= {minimum}, got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def _check_images(op_name: str, x) -> None:
    if x.ndim != 4:
        raise ShapeError(f"{op_name}: input must be 4-D (N, C, H, W), got shape {x.shape}")


def _check_window_fits(op_name, x_shape, kernel, padding) -> None:
    padded = (x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1])
    if kernel[0] > padded[0] or kernel[1] > padded[1]:
        raise ShapeError(
            f"{op_name}: kernel {kernel} is larger than the input of shape {x_shape} "
            f"padded by {padding} (spatial size {padded})"
        )


# -- conv2d ----------------------------------------------------------------------


class Conv2d(Primitive):
    """``y = conv2d(x, weight, bias)``, cross-correlation as in PyTorch, via im2col.

    Placements of the sketch (``V`` is the cotangent as (N*OH*OW, O)):

    * ``"contracted"`` (default): on the rows of ``cols`` and ``V`` (spatial
      positions x batch), the axis that ``dW = V^T cols`` contracts. With ``k``
      kept rows, ``dW = V_k^T cols_k`` and ``dX = col2im(expand(V_k Wm))`` are
      GEMMs of ``k`` rows. A data-independent sketch is drawn in the forward
      pass, which then saves only ``cols_k`` (or ``Q^T cols``), or ``x`` when
      that is smaller (a 3x3 stride-1 convolution has ``cols`` nine times the
      size of ``x``: there only the arithmetic shrinks).
    * ``"weight"``: the same rows and the same saving of memory, but only the
      weight and bias gradients are sketched; ``dX`` is exact, so the noise
      does not compound through the layers below.
    * ``"cotangent"``: on the output channels (columns of ``V``): ``dX`` and
      ``dW`` each become GEMMs over ``k`` channels; ``dW`` and ``db`` are
      nonzero on the kept channels only.

    The exact VJP saves whichever of ``x`` and ``cols`` is smaller and lowers
    ``x`` again in backward when it kept ``x``.

    Layout. The output is channel-major: an (N, O, OH, OW) array whose memory is
    laid out as (O, N, OH, OW), i.e. the C-contiguous matrix ``Y^T = Wm cols^T``
    (O x N*OH*OW) seen through a transposed view. A product that gives ``Y``
    itself (rows ``(n, oh, ow)``) would need a transposed copy to reach NCHW,
    and the elementwise and batch-norm ops after a convolution keep their
    input's layout, so the cotangent that comes back is channel-major too and
    ``V^T`` is its memory: ``dW = V^T cols`` and ``dX = col2im((V^T)^T Wm)`` are
    single products. A pointwise convolution (1x1 kernel, stride 1, no padding)
    skips the lowering: ``Y^T = Wm X^T`` with ``X^T`` (C x N*H*W) the
    channel-major input (copied into that layout when it comes otherwise),
    ``dX^T = Wm^T V^T`` and ``dW = V^T X``. For 128 images of 128 channels x 81
    positions, one OpenBLAS product over all images took 1.5 ms against 2.2 ms
    for a product per image (two threads; 2.7 against 3.4 ms on one), ``dW``
    2.0 against 3.6 ms, and a transposed copy of the array 0.5 ms; the exact
    BagNet step went from 1.4x PyTorch's time to 1.0x.

    Importance weights: rows, ``a_i = ||v_i|| sqrt(||cols_i||^2 + ||Wm||_F^2 / O)``;
    channels, ``a_j = ||V_j|| sqrt(||Wm_j||^2 + ||cols||_F^2 / O)`` (each term
    only when its gradient is needed; the second one is an isotropic estimate,
    as in :class:`~rbprop.ops.linalg.Linear`).
    """

    name = "conv2d"
    default_placement = "contracted"

    def forward(self, x, weight, bias=None):
        stride, padding = self.params["stride"], self.params["padding"]
        self._check(x, weight, bias)
        out_channels, _, kh, kw = weight.shape
        batch, _, height, width = x.shape
        out_h = output_size(height, kh, stride[0], padding[0])
        out_w = output_size(width, kw, stride[1], padding[1])

        # Y^T = Wm cols^T (O x N*OH*OW): the output comes out channel-major, with no
        # transposed copy (see the class docstring).
        weight_matrix = weight.reshape(out_channels, -1)
        if self._pointwise():
            cols = None
            x = channel_major(x)  # the matrix X^T (C x N*H*W) is this array's memory
            output = weight_matrix @ channel_rows(x)
        else:
            cols = im2col(x, kh, kw, stride, padding)
            output = weight_matrix @ cols.T
        if bias is not None:
            output += bias[:, None]
        output = output.reshape(out_channels, batch, out_h, out_w).transpose(1, 0, 2, 3)

        self.placement = self.placement or self.default_placement
        if self.placement not in ROW_PLACEMENTS + ("cotangent",):
            raise ValueError(f"conv2d: unknown placement {self.placement!r}")
        if self.recording:
            self._save_for_backward(x, cols, weight, batch * out_h * out_w)
        return output

    def _check(self, x, weight, bias):
        _check_images("conv2d", x)
        if weight.ndim != 4:
            raise ShapeError(
                f"conv2d: weight must be 4-D (out_channels, in_channels, kh, kw), "
                f"got shape {weight.shape}"
            )
        if x.shape[1] != weight.shape[1]:
            raise ShapeError(
                f"conv2d: input of shape {x.shape} has {x.shape[1]} channels but weight of "
                f"shape {weight.shape} expects {weight.shape[1]}"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ShapeError(
                f"conv2d: bias of shape {bias.shape} for a weight of shape {weight.shape}"
            )
        _check_window_fits("conv2d", x.shape, weight.shape[2:], self.params["padding"])

    def _save_for_backward(self, x, cols, weight, rows):
        """Keep ``weight`` for dX and, for dW, the smaller of ``x`` and the needed rows of cols.

        ``cols`` is None where the forward pass did not lower ``x`` (pointwise).
        """
        needs_x, needs_weight = self.needs_input_grad[:2]
        kept_rows = rows
        if self.placement in ROW_PLACEMENTS and self.wants_forward_sample():
            # Drawn now, so that only what the sampled VJP reads is kept.
            self.sample = self.draw_sample(rows)
            kept_rows = self.sample.kept
        lowered = image = None
        if needs_weight:
            if kept_rows * int(np.prod(weight.shape[1:])) < x.size:
                lowered = self._lower_for_saving(x, cols, self.sample)
            else:
                image = x
        self.save(cols=lowered, image=image, weight=weight if needs_x else None)

    def _lower_for_saving(self, x, cols, sample):
        """The rows of ``cols`` that ``sample`` keeps (all of them without one)."""
        if cols is not None:
            return cols if sample is None else sample.project(cols, axis=0)
        return self._lower(x, sample)

    def _lower(self, x, sample):
        """``cols`` of ``x``, or its rows kept by ``sample`` (``Q^T cols`` for a projection)."""
        if self._pointwise():
            # cols = X: the transpose of the (C, N*H*W) matrix of channel rows, whose
            # columns are gathered (or projected) along its contiguous rows.
            channel_matrix = channel_rows(x)
            if sample is None:
                return channel_matrix.T
            return sample.project(channel_matrix, axis=1).T
        kh, kw, stride, padding = self._geometry()
        if sample is not None and sample.is_diagonal:
            return im2col(x, kh, kw, stride, padding, rows=sample.indices)
        cols = im2col(x, kh, kw, stride, padding)
        return cols if sample is None else sample.project(cols, axis=0)

    # -- shared pieces ---------------------------------------------------------

    def _shapes(self):
        """(rows of the lowered problem, C*kh*kw, out_channels)."""
        out_channels = self.input_shapes[1][0]
        patch = int(np.prod(self.input_shapes[1][1:]))
        rows = int(np.prod(self.output_shape)) // out_channels
        return rows, patch, out_channels

    def _geometry(self):
        kh, kw = self.input_shapes[1][2:]
        return kh, kw, self.params["stride"], self.params["padding"]

    def _pointwise(self):
        """A 1x1 kernel with stride 1 and no padding: a matrix product per image."""
        return self._geometry() == (1, 1, (1, 1), (0, 0))

    def _cotangent_rows(self, cotangent):
        """The cotangent (N, O, OH, OW) as the (N*OH*OW, O) matrix ``V``."""
        batch, channels, out_h, out_w = cotangent.shape
        return cotangent.transpose(0, 2, 3, 1).reshape(batch * out_h * out_w, channels)

    def _weight_matrix(self):
        return self.weight.reshape(self.weight.shape[0], -1)

    def _lowered(self, sample=None):
        """``cols``, or its rows kept by ``sample`` (``Q^T cols`` for a projection)."""
        if self.cols is not None:
            if sample is None or sample is self.sample:
                return self.cols
            return sample.project(self.cols, axis=0)
        return self._lower(self.image, sample)

    def _input_grad(self, cols_grad, rows=None):
        kh, kw, stride, padding = self._geometry()
        return col2im(cols_grad, self.input_shapes[0], kh, kw, stride, padding, rows=rows)

    def _needs_bias_grad(self):
        return len(self.needs_input_grad) > 2 and self.needs_input_grad[2]

    def _result(self, grad_x, grad_weight, grad_bias):
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(self.input_shapes[1])
        if len(self.input_shapes) > 2:
            return grad_x, grad_weight, grad_bias
        return grad_x, grad_weight

    # -- exact -------------------------------------------------------------------

    def vjp(self, cotangent):
        # V^T (O x N*OH*OW) is the cotangent's own memory when it is channel-major, as
        # the convolution's output and the ops after it leave it: each gradient is then
        # one large product, with no transposed copy (see the class docstring).
        v_transposed = channel_rows(cotangent)
        grad_x = grad_weight = grad_bias = None
        if self.needs_input_grad[0]:
            grad_x = self._exact_input_grad(v_transposed)
        if self.needs_input_grad[1]:
            if self.cols is None and self._pointwise():
                grad_weight = v_transposed @ channel_rows(self.image).T  # dW = V^T X
            else:
                grad_weight = v_transposed @ self._lowered()  # dW = V^T cols
        if self._needs_bias_grad():
            grad_bias = v_transposed.sum(axis=1)
        return self._result(grad_x, grad_weight, grad_bias)

    def _exact_input_grad(self, v_transposed):
        """``dX = col2im(V Wm)`` from ``V^T`` (O x N*OH*OW)."""
        weight_matrix = self._weight_matrix()
        if self._pointwise():
            # dX^T = Wm^T V^T (C x N*H*W): channel-major, as the forward output.
            batch, channels, height, width = self.input_shapes[0]
            grad = weight_matrix.T @ v_transposed
            return grad.reshape(channels, batch, height, width).transpose(1, 0, 2, 3)
        return self._input_grad(v_transposed.T @ weight_matrix)

    def vjp_flops(self):
        rows, patch, out_channels = self._shapes()
        gemm = 2 * rows * patch * out_channels
        flops = gemm * (int(self.needs_input_grad[0]) + int(self.needs_input_grad[1]))
        return flops + (rows * out_channels if self._needs_bias_grad() else 0)

    # -- sampled -----------------------------------------------------------------

    def sampled_vjp(self, cotangent):
        if self.placement in ROW_PLACEMENTS:
            return self._contracted_vjp(cotangent)
        return self._channel_vjp(cotangent)

    def _patch_squared_norms(self):
        """``||cols_i||^2`` for every row, from ``cols`` or as a box sum over ``x^2``."""
        if self.cols is not None:
            return (self.cols.astype(np.float64) ** 2).sum(axis=1)
        kh, kw, stride, padding = self._geometry()
        xp = array_module(self.image)
        squared = (self.image.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
        windows = sliding_windows(pad_images(squared, padding), kh, kw, stride)
        return xp.ascontiguousarray(windows.sum(axis=(1, 4, 5))).reshape(-1)

    def _row_weights(self, cotangent):
        """``a_i`` of every row ``(n, oh, ow)``, read from the (N, O, OH, OW) cotangent."""
        xp = array_module(cotangent)
        out_channels = cotangent.shape[1]
        meets = 0.0
        if self.needs_input_grad[1]:
            meets = meets + self._patch_squared_norms()
        if self.needs_input_grad[0] and self.placement != "weight":
            meets = meets + float((self.weight.astype(np.float64) ** 2).sum()) / out_channels
        squared = (cotangent.astype(np.float64) ** 2).sum(axis=1).reshape(-1)  # ||v_i||^2
        return xp.sqrt(squared * meets)

    def _channel_weights(self, cotangent):
        """``a_j`` of every output channel, read from the (N, O, OH, OW) cotangent."""
        xp = array_module(cotangent)
        out_channels = cotangent.shape[1]
        meets = 0.0
        if self.needs_input_grad[0]:
            meets = meets + (self._weight_matrix().astype(np.float64) ** 2).sum(axis=1)
        if self.needs_input_grad[1]:
            meets = meets + float(self._patch_squared_norms().sum()) / out_channels
        squared = (cotangent.astype(np.float64) ** 2).sum(axis=(0, 2, 3))  # ||V_j||^2
        return xp.sqrt(squared * meets)

    def _kept_cotangent_rows(self, cotangent, sample):
        """``S V`` on the kept rows (k x O), gathered from the (N, O, OH, OW) cotangent.

        A diagonal sample reads its rows ``(n, oh, ow)`` straight from the
        cotangent, without forming the transposed (N*OH*OW, O) matrix ``V``;
        a projection mixes every row, so it needs all of ``V``.
        """
        if not sample.is_diagonal:
            return sample.compress(self._cotangent_rows(cotangent), axis=0)
        xp = array_module(cotangent)
        if is_channel_major(cotangent):
            # V^T is the cotangent's memory: gather its kept columns along its rows.
            return sample.compress(channel_rows(cotangent), axis=1).T
        batch, out_channels, out_h, out_w = cotangent.shape
        image, position = np.divmod(sample.indices, out_h * out_w)
        planes = cotangent.reshape(batch, out_channels, out_h * out_w)
        # Advanced indices around a slice put the kept axis first: (k, O).
        kept_rows = planes[xp.asarray(image), :, xp.asarray(position)]
        return kept_rows * xp.asarray(sample.scales, dtype=cotangent.dtype)[:, None]

    def _pointwise_kept_input_grad(self, compact, indices):
        """``dX`` of a pointwise convolution from the kept rows ``S V`` (k x O), channel-major.

        ``dX^T = Wm^T (S V)^T`` has its k kept columns (the positions ``indices``,
        distinct) nonzero: they are computed, and scattered along the channel rows.
        """
        batch, channels, height, width = self.input_shapes[0]
        kept_columns = self._weight_matrix().T @ compact.T  # C x k
        grad = conv_kernels.scatter_columns(kept_columns, indices, batch * height * width)
        return grad.reshape(channels, batch, height, width).transpose(1, 0, 2, 3)

    def _contracted_vjp(self, cotangent):
        rows, patch, out_channels = self._shapes()
        sample = self.sample
        if sample is None:  # importance: drawn now, from the cotangent
            sample = self.draw_sample(rows, weights=self._row_weights(cotangent))
        compact = self._kept_cotangent_rows(cotangent, sample)  # k x O: the kept rows of S V
        kept = sample.kept
        grad_x = grad_weight = grad_bias = None
        flops = 0
        if self.needs_input_grad[0] and self.placement == "weight":
            grad_x = self._exact_input_grad(channel_rows(cotangent))
            flops += 2 * rows * out_channels * patch
        elif self.needs_input_grad[0]:
            # dX = col2im(S V Wm): the GEMM runs on the k kept rows, and col2im_rows
            # adds just those rows back (the zero rows of S V Wm are never formed).
            if sample.is_diagonal and self._pointwise():
                grad_x = self._pointwise_kept_input_grad(compact, sample.indices)
            elif sample.is_diagonal:
                partial = compact @ self._weight_matrix()
                grad_x = self._input_grad(partial, rows=sample.indices)
            else:
                partial = compact @ self._weight_matrix()
                grad_x = self._input_grad(sample.expand(partial, axis=0))
            flops += 2 * kept * out_channels * patch
        if self.needs_input_grad[1]:
            grad_weight = rows_product(compact, self._lowered(sample))  # dW = V_k^T cols_k
            flops += 2 * kept * out_channels * patch
        if self._needs_bias_grad():
            grad_bias = _sum_rows(sample, compact, array_module(cotangent))
            flops += kept * out_channels
        if not sample.is_diagonal:
            flops += 2 * rows * kept * out_channels  # Q^T V
            needed = int(self.needs_input_grad[0]) + int(self.needs_input_grad[1])
            flops += 2 * rows * kept * patch * needed  # Q^T cols, Q (c Wm)
        self._sampled_flops = flops
        return self._result(grad_x, grad_weight, grad_bias)

    def _channel_vjp(self, cotangent):
        weights = self._channel_weights(cotangent) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(cotangent.shape[1], weights=weights)
        # rows x k: V S on the kept channels, gathered before the transpose to rows.
        compact = self._cotangent_rows(sample.compress(cotangent, axis=1))
        rows, patch, out_channels = self._shapes()
        kept = sample.kept
        grad_x = grad_weight = grad_bias = None
        flops = 0
        if self.needs_input_grad[0]:
            kept_weight = sample.project(self._weight_matrix(), axis=0)  # k x C*kh*kw
            grad_x = self._input_grad(compact @ kept_weight)
            flops += 2 * rows * kept * patch
        if self.needs_input_grad[1]:
            grad_weight = sample.expand(compact.T @ self._lowered(), axis=0)
            flops += 2 * rows * kept * patch
        if self._needs_bias_grad():
            grad_bias = sample.expand(compact.sum(axis=0), axis=0)
            flops += rows * kept
        if not sample.is_diagonal:
            flops += 2 * rows * out_channels * kept  # V Q
            flops += 2 * kept * out_channels * patch * int(self.needs_input_grad[0])
            flops += 2 * kept * out_channels * patch * int(self.needs_input_grad[1])
        self._sampled_flops = flops
        return self._result(grad_x, grad_weight, grad_bias)


def conv2d(input, weight, bias=None, stride=1, padding=0) -> Tensor:  # noqa: A002
    """2-D cross-correlation of NCHW ``input`` with ``weight`` (O, C, kh, kw), as in torch."""
    stride = _pair("conv2d", "stride", stride, 1)
    padding = _pair("conv2d", "padding", padding, 0)
    inputs = (input, weight) if bias is None else (input, weight, bias)
    return record(Conv2d, *(as_tensor(value) for value in inputs), stride=stride, padding=padding)


# -- pooling -------------------------------------------------------------------


class Pool2d(Primitive):
    """Shared geometry of the pooling ops: row-local along the batch axis."""

    row_local = True

    def setup(self, x):
        _check_images(self.name, x)
        kernel, padding = self.params["kernel_size"], self.params["padding"]
        if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
            raise ValueError(
                f"{self.name}: padding {padding} must be at most half the kernel size {kernel}"
            )
        _check_window_fits(self.name, x.shape, kernel, padding)

    def _geometry(self):
        """``(kernel_size, stride, padding)``, as the pooling kernels take them."""
        return self.params["kernel_size"], self.params["stride"], self.params["padding"]


class MaxPool2d(Pool2d):
    """Maximum over each window (padding counts as ``-inf``); the first maximum wins ties.

    Saves only the position of each window's maximum (one byte per output
    element for kernels of up to 255 entries); the VJP adds each cotangent to
    the pixel at that position.
    """

    name = "max_pool2d"

    def forward(self, x):
        self.setup(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"max_pool2d: input must be floating point, got dtype {x.dtype}")
        output, position = pool_kernels.max_pool2d(x, *self._geometry())
        self.save(position=position)
        return output

    def vjp(self, cotangent):
        shape = self.input_shapes[0]
        return (
            pool_kernels.max_pool2d_backward(cotangent, self.position, shape, *self._geometry()),
        )

    def vjp_flops(self):
        return int(np.prod(self.output_shape))  # one addition per output element


class AvgPool2d(Pool2d):
    """Mean over each window; padded zeros count in the divisor (torch's default).

    The VJP spreads ``v / (kh kw)`` over every pixel of the window.
    """

    name = "avg_pool2d"

    def forward(self, x):
        self.setup(x)
        return pool_kernels.avg_pool2d(x, *self._geometry())

    def vjp(self, cotangent):
        shape = self.input_shapes[0]
        return (pool_kernels.avg_pool2d_backward(cotangent, shape, *self._geometry()),)

    def vjp_flops(self):
        kh, kw = self.params["kernel_size"]
        return int(np.prod(self.output_shape)) * (kh * kw + 1)


def _pool(op_class, input, kernel_size, stride, padding):  # noqa: A002
    kernel = _pair(op_class.name, "kernel_size", kernel_size, 1)
    stride = kernel if stride is None else _pair(op_class.name, "stride", stride, 1)
    padding = _pair(op_class.name, "padding", padding, 0)
    return record(op_class, as_tensor(input), kernel_size=kernel, stride=stride, padding=padding)


def max_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:  # noqa: A002
    """Max pooling of NCHW ``input``; ``stride`` defaults to ``kernel_size`` (as in torch)."""
    return _pool(MaxPool2d, input, kernel_size, stride, padding)


def avg_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:  # noqa: A002
    """Average pooling of NCHW ``input``, padded zeros counted (``count_include_pad=True``)."""
    return _pool(AvgPool2d, input, kernel_size, stride, padding)
