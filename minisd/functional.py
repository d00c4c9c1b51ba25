"""Pure forward/backward pairs: the math of every layer, written out by hand.

Each operation is a pair::

    out, cache = op_forward(inputs..., options...)
    grads      = op_backward(dout, cache)

``forward`` keeps in ``cache`` exactly what ``backward`` needs; ``backward`` returns the gradient
with respect to each input, in the order the forward took them, and never writes into ``dout``.

Shapes follow PyTorch: activations are NCHW, a conv weight is (out_channels, in_channels, kh, kw),
a linear weight is (out_features, in_features).

Memory layout (the one speed trick that shapes this file)
---------------------------------------------------------
Every array here *is* NCHW: ``y.shape == (N, C, H, W)`` and ``y[n, c, h, w]`` is what you expect.
But the arrays that convolutions and batch norm create are stored **channel-major** in memory,
as if they were (C, N, H, W), and handed out as the transposed view. Why: a convolution is the
matrix product ``W (O, C*kh*kw) @ cols (C*kh*kw, N*H*W)``; its result (O, N*H*W) *is* channel-major,
and so is the column matrix built from a channel-major input, one contiguous slab per kernel
offset. Returning the view instead of transposing back to NCHW saves two full copies per layer
in forward and two in backward. Element-wise NumPy operations keep the memory order of their
inputs (``order="K"``), so ReLU, residual sums and batch norm stay channel-major too, and the
next convolution reads its input without a copy. :func:`channel_rows` is where the layout is used.

Convolutions unfold a few images at a time into small reused buffers, so the columns stay in
cache between the unfolding and the product (see "Scratch buffers" below for why). A stride-1
"same" convolution, the 3x3 conv of every residual block, unfolds only along the width and turns
the kernel rows into slides of the product (see :func:`_same_conv_chunks`).
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from minisd.backend import array_module, is_device_array

__all__ = [
    "conv_output_size",
    "channel_rows",
    "empty_channel_major",
    "im2col",
    "col2im",
    "clear_workspace",
    "set_num_threads",
    "get_num_threads",
    "conv2d_forward",
    "conv2d_backward",
    "batch_norm_forward",
    "batch_norm_backward",
    "relu_forward",
    "relu_backward",
    "linear_forward",
    "linear_backward",
    "global_avg_pool_forward",
    "global_avg_pool_backward",
    "shortcut_forward",
    "shortcut_backward",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
]


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, padding: int, where: str = "conv2d") -> int:
    """Output length of a convolution along one axis: floor((size + 2p - k) / s) + 1.

    Raises ValueError (naming ``where``) when the kernel is larger than the padded input, instead of
    silently producing an empty array.
    """
    padded = size + 2 * padding
    if kernel > padded:
        raise ValueError(
            f"{where}: kernel size {kernel} is larger than the padded input "
            f"({size} + 2*padding {padding} = {padded}); expected kernel <= {padded}"
        )
    if stride < 1:
        raise ValueError(f"{where}: stride must be >= 1, got {stride}")
    return (padded - kernel) // stride + 1


def channel_rows(x):
    """View an NCHW array as a (C, N*H*W) matrix: one row per channel.

    Free (a view) when ``x`` is stored channel-major, as the outputs of this module are; a copy
    otherwise (for example the network's input batch).
    """
    n, c = x.shape[0], x.shape[1]
    return x.transpose(1, 0, 2, 3).reshape(c, -1) if x.ndim == 4 else x.reshape(n, c).T


def empty_channel_major(xp, shape, dtype, zero: bool = False):
    """An uninitialised (or zeroed) NCHW array stored channel-major, as (C, N, H, W) in memory."""
    n, c, h, w = shape
    make = xp.zeros if zero else xp.empty
    return make((c, n, h, w), dtype=dtype).transpose(1, 0, 2, 3)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------
# Scratch buffers
# ----------------------------------------------------------------------------------------------

# Why: a column matrix is 9x the size of the activation it comes from (75 MiB for a 16-channel
# 32x32 batch of 128). Two things make a whole-batch column matrix slow on a CPU:
# * memory bandwidth: im2col writes it out to main memory and the product reads it back, and at
#   these sizes moving the bytes costs as much as the arithmetic;
# * first touch: fresh memory is slow the first time it is written (the kernel maps and zeroes
#   every page, about 0.45 ms per MiB here), and arrays that large go back to the OS when freed,
#   so a fresh column matrix per layer pays that again at every step.
# So the convolutions below unfold a few images at a time (about CHUNK_BYTES of scratch, small
# enough to stay in the caches: a core's L2 holds 1 MiB here, the shared L3 36 MiB) into reused
# buffers, and run the product on them while they are still in cache. The buffers never leave the
# function that filled them: the forward keeps only its input x (an array the previous layer made
# anyway) and the backward unfolds what it needs again (for a stride-1 "same" conv, dy's width
# columns and x's height columns, see :func:`_conv_grads_from_dy_columns`; x's full columns
# otherwise). That costs an unfolding per layer in backward and saves the memory of every column
# matrix. Smaller chunks mean more, smaller products (and with several BLAS threads, one thread
# hand-off per product); 3 MiB measured best on a 2-core machine (a ResNet-20 step with 1 MiB
# chunks took about 1.25x as long, with 4 MiB 1.04-1.12x, with 16 MiB 1.25x).
# On a GPU (CuPy arrays) the whole batch is one chunk: there, one large product is what is fast.
CHUNK_BYTES = 3 << 20
_WORKSPACE: dict = {}


def _scratch(xp, shape, dtype, purpose="columns"):
    """A reused, uninitialised C-contiguous array of ``shape``: a view of one growing flat buffer.

    Only for values that die inside the function that asked: the next call overwrites them.
    One buffer per (array module, dtype, thread, purpose): arrays alive at the same time need
    different purposes.
    """
    size = 1
    for s in shape:
        size *= int(s)
    key = (xp.__name__, xp.dtype(dtype).str, threading.get_ident(), purpose)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.size < size:
        _WORKSPACE.pop(key, None)  # free the old buffer before allocating the larger one
        buf = _WORKSPACE[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def clear_workspace() -> None:
    """Free the scratch buffers that convolutions reuse (they are re-created on demand)."""
    _WORKSPACE.clear()
    _ONES.clear()


def _images_per_chunk(x, scratch_bytes_per_image, threads=1):
    """How many images of x to unfold at once: about CHUNK_BYTES of scratch (all on a GPU).

    With several threads, the chunk count is rounded up to a multiple of ``threads`` so that every
    thread gets the same number of chunks (no thread waits idle for the last one).
    """
    n = x.shape[0]
    if is_device_array(x) or n * scratch_bytes_per_image <= CHUNK_BYTES:
        # The whole batch fits in one chunk (8x8 digits, say): one product, no thread hand-off,
        # which would cost more than it saves (measured: 2.4 s vs 1.7 s per digits epoch).
        return max(n, 1)
    step = max(1, min(n, CHUNK_BYTES // max(1, scratch_bytes_per_image)))
    if threads > 1:
        chunks = -(-n // step)
        chunks = -(-chunks // threads) * threads
        step = max(1, -(-n // chunks))
    return step


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------

# Why: only the matrix products use more than one core by themselves (through the BLAS), and on
# the thin products of one chunk OpenBLAS gains little from its second thread. im2col, col2im and
# the rest are NumPy copies that run on one core. NumPy releases the GIL in copies and in BLAS
# calls, so plain Python threads can run whole chunks (im2col, product, col2im) side by side: each
# thread with its own scratch buffers (see :func:`_scratch`) and a one-thread BLAS, so the cores
# are not oversubscribed. Results stay deterministic: every chunk writes its own slice of the
# output, and per-chunk weight gradients are added in chunk order, not in the order threads finish.
_MAX_DEFAULT_THREADS = 4
_NUM_THREADS = None  # None: read MINISD_NUM_THREADS or the CPU count at first use
_POOL = None
_BLAS = None  # a threadpoolctl controller (False if threadpoolctl is missing)


def set_num_threads(n: int | None) -> None:
    """Use ``n`` Python threads for the chunks of a CPU convolution (1: no threads).

    ``None`` restores the default: the environment variable ``MINISD_NUM_THREADS``, else
    ``os.cpu_count()`` capped at 4. While a convolution runs its chunks on several threads it
    limits the BLAS to one thread each (with threadpoolctl) and restores your setting afterwards.
    The thread count decides how a batch is cut into chunks, so results are bit-identical run to
    run for a fixed count, but may differ in the last bits between different counts.
    """
    global _NUM_THREADS, _POOL
    if n is not None and int(n) < 1:
        raise ValueError(f"set_num_threads: expected n >= 1 or None, got {n}")
    _NUM_THREADS = None if n is None else int(n)
    if _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None
        _WORKSPACE.clear()  # the old threads' scratch buffers (keyed by their ids) would linger


def get_num_threads() -> int:
    """The number of threads CPU convolutions use (see :func:`set_num_threads`)."""
    if _NUM_THREADS is not None:
        return _NUM_THREADS
    env = os.environ.get("MINISD_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"MINISD_NUM_THREADS must be a positive integer, got {env!r}") from None
    return max(1, min(os.cpu_count() or 1, _MAX_DEFAULT_THREADS))


def _one_blas_thread():
    """A context that limits the BLAS to one thread (a no-op without threadpoolctl)."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415
        except ImportError:
            _BLAS = False
        else:
            _BLAS = ThreadpoolController()  # made after NumPy is loaded, so it sees its BLAS
    if _BLAS is False:
        import contextlib  # noqa: PLC0415

        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


def _map_chunks(fn, starts, threads):
    """[fn(n0) for n0 in starts], on ``threads`` threads; results in the order of ``starts``.

    Each thread (the calling one included) takes the next chunk not yet taken until none is left,
    so a thread that started late or ran slower takes fewer. Every result is stored at its chunk's
    place, so the list does not depend on which thread ran which chunk.
    """
    global _POOL
    if threads <= 1 or len(starts) <= 1:
        return [fn(n0) for n0 in starts]
    threads = min(threads, len(starts))
    if _POOL is None or _POOL._max_workers < threads - 1:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="minisd-conv")
    results = [None] * len(starts)
    taken = itertools.count()  # next() on it is atomic under the GIL: each index is taken once

    def run():
        for i in iter(taken.__next__, None):
            if i >= len(starts):
                return
            results[i] = fn(starts[i])

    with _one_blas_thread():
        futures = [_POOL.submit(run) for _ in range(threads - 1)]
        try:
            run()
        finally:
            for f in futures:
                f.result()  # waits for every thread (and re-raises its error)
    return results


# Below this many elements a thread hand-off costs more than the pass it would split.
_SPLIT_MIN_SIZE = 1 << 18


def _map_channel_groups(fn, x):
    """fn(channel slice) over the channels of ``x`` (axis 1), split into one group per thread.

    For the element-wise and per-channel passes (batch norm, ReLU), which NumPy runs on one core:
    the groups of channels run side by side, as the chunks of a convolution do. Small or device
    arrays get a single call with ``slice(None)`` (every channel).
    """
    channels = x.shape[1] if x.ndim >= 2 else 1
    threads = 1 if is_device_array(x) or x.size < _SPLIT_MIN_SIZE else min(get_num_threads(), channels)
    if threads <= 1:
        fn(slice(None))
        return
    step = -(-channels // threads)
    _map_chunks(lambda c0: fn(slice(c0, c0 + step)), range(0, channels, step), threads)


# ----------------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------------


def _overlap(size, k, stride, pad, out_size):
    """For kernel offset ``k`` along one axis: which outputs read a real input, and which inputs.

    Output o reads input p = o * stride + k - pad. Returns (o0, o1, p0, p1): outputs o0 <= o < o1
    read inputs p0, p0 + stride, ... < p1; the others read the zero padding.
    """
    o0 = max(0, -((k - pad) // stride))  # ceil((pad - k) / stride)
    o1 = min(out_size, (size - 1 + pad - k) // stride + 1)
    o1 = max(o0, o1)
    p0 = o0 * stride + k - pad
    return o0, o1, p0, p0 + (o1 - o0 - 1) * stride + 1


def _slides(h, w, ho, wo, sh, sw):
    """True for the common convolution: stride 1 and "same" padding (output as large as input).

    Then every kernel offset just slides the whole flattened input by a fixed number of places,
    and im2col / col2im can work on long contiguous runs (see :func:`_im2col_slide_into`).
    """
    return sh == 1 and sw == 1 and ho == h and wo == w


def _zero_wrapped(slab, dh, dw):
    """Zero the outputs of offset (dh, dw) whose receptive field hangs over an image edge.

    slab: (C, N, H, W). Sliding the flattened input by dh*W + dw places puts, at these pixels, a
    value from the neighbouring row or image; they should have read the zero padding.
    """
    h, w = slab.shape[2], slab.shape[3]
    if dh > 0:
        slab[:, :, max(h - dh, 0):] = 0
    elif dh < 0:
        slab[:, :, :-dh] = 0
    if dw > 0:
        slab[:, :, :, max(w - dw, 0):] = 0
    elif dw < 0:
        slab[:, :, :, :-dw] = 0


def _im2col_slide_into(cols, x_cm, kh, kw, ph, pw):
    """im2col for stride 1 and "same" padding, in long contiguous copies.

    In the flattened (C, N*H*W) input, output pixel t of kernel offset (i, j) reads input pixel
    t + d, with d = (i - ph) * W + (j - pw). So row block (c, i, j) of the column matrix is the
    input slid by d places: one long copy per channel. The pixels that slid across a row or image
    edge are a row or a column of each image, zeroed afterwards. (The general loop copies 4-D
    slabs whose innermost run is one image row, 32 values here: many short copies, several times
    slower.)
    """
    c, n, h, w = x_cm.shape
    total = n * h * w
    flat = x_cm.reshape(c, total)  # a view when x is channel-major (a copy otherwise)
    rows = cols.reshape(c, kh * kw, total)
    for i in range(kh):
        for j in range(kw):
            dh, dw = i - ph, j - pw
            d = max(-total, min(total, dh * w + dw))
            row = rows[:, i * kw + j]  # (C, N*H*W)
            if d >= 0:
                row[:, : total - d] = flat[:, d:]
                row[:, total - d :] = 0
            else:
                row[:, -d:] = flat[:, : total + d]
                row[:, :-d] = 0
            _zero_wrapped(cols[:, i, j], dh, dw)
    return cols


def _im2col_into(cols, x, kh, kw, sh, sw, ph, pw):
    """Fill ``cols`` (C, kh, kw, N, Ho, Wo) with the receptive fields of x (see :func:`im2col`)."""
    n, c, h, w = x.shape
    ho, wo = cols.shape[4], cols.shape[5]
    x_cm = x.transpose(1, 0, 2, 3)  # (C, N, H, W): a free view when x is channel-major
    if _slides(h, w, ho, wo, sh, sw):
        return _im2col_slide_into(cols, x_cm, kh, kw, ph, pw)
    for i in range(kh):
        oh0, oh1, h0, h1 = _overlap(h, i, sh, ph, ho)
        for j in range(kw):
            ow0, ow1, w0, w1 = _overlap(w, j, sw, pw, wo)
            slab = cols[:, i, j]  # (C, N, Ho, Wo): the input shifted by (i, j), subsampled
            if oh1 > oh0 and ow1 > ow0:
                slab[:, :, oh0:oh1, ow0:ow1] = x_cm[:, :, h0:h1:sh, w0:w1:sw]
            # Outputs whose field hangs over the border read zero padding. Writing these thin
            # borders directly is cheaper than building a zero-padded copy of x first.
            slab[:, :, :oh0] = 0
            slab[:, :, oh1:] = 0
            slab[:, :, oh0:oh1, :ow0] = 0
            slab[:, :, oh0:oh1, ow1:] = 0
    return cols


def _col2im_into(dx, cols6, kh, kw, sh, sw, ph, pw, overwrite):
    """col2im of cols6 (C, kh, kw, N, Ho, Wo) written into dx (C, N, H, W); returns dx.

    ``overwrite``: cols6 is scratch that may be changed (the slide path zeroes wrapped entries).
    dx may be a slice of a larger array along N (one chunk of images).
    """
    c, n, h, w = dx.shape
    ho, wo = cols6.shape[4], cols6.shape[5]
    if _slides(h, w, ho, wo, sh, sw):
        # The adjoint of the slide: row block (c, i, j) slides back by d places and is added.
        # Entries that slid across an edge belong to the padding: zero them first. The centre
        # offset (d = 0) covers every pixel once, so it initialises dx instead of a zero fill.
        if not overwrite:
            cols6 = cols6.copy()
        total = n * h * w
        rows = cols6.reshape(c, kh * kw, total)
        flat = dx.reshape(c, total)  # a view: dx holds whole images, contiguous along (N, H, W)
        flat[...] = rows[:, ph * kw + pw]
        for i in range(kh):
            for j in range(kw):
                dh, dw = i - ph, j - pw
                if dh == 0 and dw == 0:
                    continue
                _zero_wrapped(cols6[:, i, j], dh, dw)
                d = max(-total, min(total, dh * w + dw))
                row = rows[:, i * kw + j]
                if d >= 0:
                    flat[:, d:] += row[:, : total - d]
                else:
                    flat[:, : total + d] += row[:, -d:]
        return dx
    dx[...] = 0
    for i in range(kh):
        oh0, oh1, h0, h1 = _overlap(h, i, sh, ph, ho)
        for j in range(kw):
            ow0, ow1, w0, w1 = _overlap(w, j, sw, pw, wo)
            if oh1 > oh0 and ow1 > ow0:
                dx[:, :, h0:h1:sh, w0:w1:sw] += cols6[:, i, j, :, oh0:oh1, ow0:ow1]
    return dx


def _conv_geometry(x_shape, kernel_size, stride, padding, where):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    ho = conv_output_size(x_shape[2], kh, sh, ph, where)
    wo = conv_output_size(x_shape[3], kw, sw, pw, where)
    return kh, kw, sh, sw, ph, pw, ho, wo


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold every receptive field of ``x`` into a column.

    x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo), rows ordered (c, i, j) to match
    ``weight.reshape(O, C*kh*kw)``, columns ordered (n, ho, wo).

    Built with one strided slab copy per kernel offset (i, j): row block (c, i, j) of the column
    matrix is the input shifted by (i, j) and subsampled by the stride. kh*kw copies of a whole
    slab, no per-element Python loop. (The convolutions use the same loop on a reused buffer.)
    """
    xp = array_module(x)
    n, c = x.shape[0], x.shape[1]
    kh, kw, sh, sw, ph, pw, ho, wo = _conv_geometry(x.shape, kernel_size, stride, padding, "im2col")
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    _im2col_into(cols, x, kh, kw, sh, sw, ph, pw)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """The adjoint of :func:`im2col`: scatter-add every column back to the pixels it came from.

    cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W) (channel-major in memory). A pixel that sat in
    several receptive fields receives the sum of their gradients: one slab add per kernel offset.
    Columns that read the zero padding are simply dropped (the padding has no gradient).
    """
    n, c, h, w = x_shape
    kh, kw, sh, sw, ph, pw, ho, wo = _conv_geometry(x_shape, kernel_size, stride, padding, "col2im")
    xp = array_module(cols)
    if cols.shape != (c * kh * kw, n * ho * wo):
        raise ValueError(f"col2im: expected cols of shape {(c * kh * kw, n * ho * wo)}, got {cols.shape}")
    dx = xp.empty((c, n, h, w), dtype=cols.dtype)
    _col2im_into(dx, cols.reshape(c, kh, kw, n, ho, wo), kh, kw, sh, sw, ph, pw, overwrite=False)
    return dx.transpose(1, 0, 2, 3)


# ----------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, Ho, Wo).
    y = W (O, C*kh*kw) @ im2col(x) (C*kh*kw, N*Ho*Wo), plus bias per output channel,
    computed a chunk of images at a time (see CHUNK_BYTES). The cache keeps x, not the column
    matrix (kh*kw times larger than x): backward builds the columns it needs itself.

    A stride-1 "same" convolution (the 3x3 convs inside every residual block) computes the same
    sum in a cheaper order: see :func:`_same_conv_chunks`.
    """
    xp = array_module(x, weight)
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    _, _, sh, sw, ph, pw, ho, wo = _conv_geometry(x.shape, (kh, kw), stride, padding, "conv2d")
    # (O, N, Ho, Wo): the product's natural layout, handed out as an NCHW view (module docstring).
    out = xp.empty((out_channels, n, ho, wo), dtype=x.dtype)
    threads = 1 if is_device_array(x) else get_num_threads()
    if _slides(h, w, ho, wo, sh, sw):
        chunk, bytes_per_image = _same_conv_chunks(x, weight, out, ph, pw)
    else:
        k = c * kh * kw
        w_rows = weight.reshape(out_channels, k)
        bytes_per_image = k * ho * wo * x.dtype.itemsize

        def chunk(n0, n1):
            xs = x[n0:n1]
            m = xs.shape[0]
            cols = _im2col_into(_scratch(xp, (c, kh, kw, m, ho, wo), x.dtype), xs, kh, kw, sh, sw, ph, pw)
            # The product, written straight into this chunk's columns of the output.
            xp.matmul(w_rows, cols.reshape(k, m * ho * wo), out=out[:, n0:n1].reshape(out_channels, m * ho * wo))

    step = _images_per_chunk(x, bytes_per_image, threads)
    _map_chunks(lambda n0: chunk(n0, n0 + step), range(0, n, step), threads)
    if bias is not None:
        out += bias[:, None, None, None]
    y = out.transpose(1, 0, 2, 3)
    cache = (x, weight, bias is not None, stride, padding)
    return y, cache


def _same_conv_chunks(x, weight, out, ph, pw):
    """A stride-1 "same" convolution, chunk by chunk: im2col along the width only.

    The full column matrix repeats every input value kh*kw times. But a kernel row i only moves
    the input up or down by whole image rows, and in the flattened (C, N*H*W) layout that is a
    slide of the *product* by (i - ph) * W places, not a new copy of the input. So::

        cols_w = the kw width shifts of x                    (C*kw, N*H*W)   kw copies, not kh*kw
        Z      = W_stack (kh*O, C*kw) @ cols_w               (kh, O, N*H*W)  one product
        y      = sum_i Z[i] slid by (i - ph) image rows       (O, N*H*W)      kh - 1 slid adds

    with W_stack[(i, o), (c, j)] = W[o, c, i, j]. Same sum, same multiplications; the copies shrink
    from kh*kw to kw slabs of x, and the product is taller and less deep (kh*O rows instead of O),
    a shape that OpenBLAS runs about 1.5x faster for 16 output channels (measured on this machine).
    The rows of Z[i] that would slide into a neighbouring image are zeroed first (they stand for
    the zero padding above and below each image); see :func:`_add_row_shifts`.

    Returns (chunk, bytes_per_image): chunk(n0, n1) writes out[:, n0:n1] (out is (O, N, H, W)).
    """
    xp = array_module(x, weight)
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    out_channels, _, kh, kw = weight.shape
    w_stack = weight.transpose(2, 0, 1, 3).reshape(kh * out_channels, c * kw)  # a small copy
    x_cm = x.transpose(1, 0, 2, 3)  # (C, N, H, W): a free view when x is channel-major

    def chunk(n0, n1):
        xs = x_cm[:, n0:n1]
        m = xs.shape[1]
        cols_w = _width_columns(xs, kw, pw)
        z = _scratch(xp, (kh, out_channels, m * h * w), x.dtype, "kernel rows")
        xp.matmul(w_stack, cols_w, out=z.reshape(kh * out_channels, m * h * w))
        _add_row_shifts(out[:, n0:n1].reshape(out_channels, m * h * w), z, h, w, ph)

    return chunk, (c * kw + kh * out_channels) * h * w * x.dtype.itemsize


def _width_columns(x_cm, kw, pw):
    """im2col along the width only: (C*kw, M*H*W), row (c, j) = channel c slid by j - pw columns.

    x_cm: (C, M, H, W). The values that slid across a column edge are zero (the padding at the
    left and right of each image). A view of the reused "columns" scratch buffer: valid until the
    next unfolding on this thread.
    """
    c, m, h, w = x_cm.shape
    cols = _scratch(array_module(x_cm), (c, 1, kw, m, h, w), x_cm.dtype)
    _im2col_slide_into(cols, x_cm, 1, kw, 0, pw)
    return cols.reshape(c * kw, m * h * w)


def _height_columns(x_cm, kh, ph):
    """im2col along the height only: (C*kh, M*H*W), row (c, i) = channel c slid by i - ph rows.

    x_cm: (C, M, H, W). Rows that slid into a neighbouring image are zero (the padding above and
    below each image). A view of the reused "height columns" scratch buffer: valid until the next
    height unfolding on this thread.
    """
    c, m, h, w = x_cm.shape
    cols = _scratch(array_module(x_cm), (c, kh, 1, m, h, w), x_cm.dtype, "height columns")
    _im2col_slide_into(cols, x_cm, kh, 1, ph, 0)
    return cols.reshape(c * kh, m * h * w)


def _add_row_shifts(out_rows, z, h, w, ph):
    """out[:, t] = sum_i z[i][:, t + (i - ph) * W]: the kernel rows of a same conv, as slides.

    z: (kh, O, M*H*W) per-kernel-row products (written to: see below); out_rows: (O, M*H*W).
    Kernel row i reads the input dh = i - ph rows lower, so z[i] slides up by dh*W places. Its
    first dh rows of each image (dh > 0), or last -dh rows (dh < 0), would land in the previous
    or next image, where the true convolution reads zero padding: they are zeroed before the add.
    The centre row (dh = 0) covers every pixel once, so it initialises out instead of a zero fill.
    """
    kh, total = z.shape[0], out_rows.shape[1]
    out_rows[...] = z[ph]
    for i in range(kh):
        dh = i - ph
        if dh == 0:
            continue
        images = z[i].reshape(z.shape[1], -1, h, w)
        if dh > 0:
            images[:, :, :dh] = 0
        else:
            images[:, :, max(h + dh, 0) :] = 0
        d = max(-total, min(total, dh * w))
        if d > 0:
            out_rows[:, : total - d] += z[i][:, d:]
        else:
            out_rows[:, -d:] += z[i][:, : total + d]


def conv2d_backward(dy, cache, input_grad=True):
    """Gradients of :func:`conv2d_forward`: returns (dx, dweight, dbias or None).

    With dY as a (O, N*Ho*Wo) matrix: dW = dY @ cols^T, db = row sums of dY,
    dcols = W^T @ dY, and dx = col2im(dcols); chunk by chunk of images, dW summed over chunks.
    That is the general path (strided convolutions, and :func:`col2im`, where students read it).

    A stride-1 "same" convolution (the 3x3 convs inside every residual block) takes a shorter
    path: dy's width columns and x's height columns, no full column matrix (see
    :func:`_conv_grads_from_dy_columns`).

    ``input_grad=False`` skips dx (returned as None), as PyTorch does for an input that does not
    require grad: a network's first convolution, whose input is the images, needs only dW.
    """
    x, weight, has_bias, stride, padding = cache
    xp = array_module(dy, weight)
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    _, _, sh, sw, ph, pw, ho, wo = _conv_geometry(x.shape, (kh, kw), stride, padding, "conv2d")
    # channel-major, like every activation here
    dx = xp.empty((c, n, h, w), dtype=x.dtype) if input_grad else None
    threads = 1 if is_device_array(x) else get_num_threads()
    if input_grad and _slides(h, w, ho, wo, sh, sw):
        chunk, bytes_per_image = _conv_grads_from_dy_columns(x, weight, dy, dx, ph, pw)
    else:
        # Strided convolutions, and any convolution whose dx is not wanted (the stem: x's full
        # columns are C*kh*kw = 27 rows per pixel there, fewer than the dy path would unfold).
        chunk, bytes_per_image = _conv_grads_from_x_columns(x, weight, dy, dx, sh, sw, ph, pw, ho, wo)
    step = _images_per_chunk(x, bytes_per_image, threads)
    # dW is the sum of the chunks' shares, added in chunk order (deterministic with threads).
    dweight = None
    for share in _map_chunks(lambda n0: chunk(n0, n0 + step), range(0, n, step), threads):
        dweight = share if dweight is None else dweight + share
    dbias = channel_rows(dy).sum(axis=1) if has_bias else None
    return (None if dx is None else dx.transpose(1, 0, 2, 3)), xp.ascontiguousarray(dweight), dbias


def _conv_grads_from_x_columns(x, weight, dy, dx, sh, sw, ph, pw, ho, wo):
    """The textbook backward, for images n0:n1: unfold x again, dW from its columns, dx by col2im.

    Returns (chunk, bytes_per_image): chunk(n0, n1) writes dx[:, n0:n1] (unless dx is None: no
    input gradient) and returns this chunk's share of dW.
    """
    xp = array_module(dy, weight)
    c, kh, kw = x.shape[1], weight.shape[2], weight.shape[3]
    out_channels, k = weight.shape[0], x.shape[1] * kh * kw
    w_rows = weight.reshape(out_channels, k)
    dy_cm = dy.transpose(1, 0, 2, 3)  # (O, N, Ho, Wo): a free view when dy is channel-major

    def chunk(n0, n1):
        xs = x[n0:n1]
        m = xs.shape[0]
        dy_rows = dy_cm[:, n0:n1].reshape(out_channels, m * ho * wo)
        # The columns again, in the reused buffer (the forward did not keep them).
        buf = _scratch(xp, (k, m * ho * wo), x.dtype)
        cols = _im2col_into(buf.reshape(c, kh, kw, m, ho, wo), xs, kh, kw, sh, sw, ph, pw).reshape(buf.shape)
        # dW^T = cols @ dY^T: the same product as dY @ cols^T, but OpenBLAS runs this orientation
        # of the thin shapes (a long reduction, a (C*kh*kw, O) result) about 1.5x faster here.
        dweight = (cols @ dy_rows.T).T.reshape(weight.shape)
        if dx is None:
            return dweight
        # cols is no longer needed: W^T @ dY overwrites the same buffer (no fresh 9x-sized array).
        dcols = xp.matmul(w_rows.T, dy_rows, out=buf)
        _col2im_into(dx[:, n0:n1], dcols.reshape(c, kh, kw, m, ho, wo), kh, kw, sh, sw, ph, pw, overwrite=True)
        return dweight

    return chunk, k * ho * wo * x.dtype.itemsize  # the column matrix of x


def _conv_grads_from_dy_columns(x, weight, dy, dx, ph, pw):
    """Backward of a stride-1 "same" convolution, chunk by chunk, from the width columns of dy.

    dx is what it equals, a "same" convolution of dy with the kernel flipped in space and its
    in/out channels swapped, W_flip[c, o, i, j] = W[o, c, kh-1-i, kw-1-j]; it runs as the forward
    does (:func:`_same_conv_chunks`): dy's kw width shifts, one product, kh - 1 slid adds. No 9x
    dcols for col2im to read back and scatter-add.

    dW comes from the same width columns of dy, times *height* columns of x. By definition
    dW[o, c, i, j] = sum_p dy[o, p] x[c, p + (i - ph) W + (j - pw)], over the pairs of pixels that
    do not cross the zero padding. Substitute s = p + (j - pw): the column part of the offset moves
    to dy's side, the row part stays on x's::

        dW[o, c, i, j] = sum_s dy[o, s - (j - pw)] x[c, s + (i - ph) W]
                       = sum_s cols_w(dy)[(o, kw-1-j), s] cols_h(x)[(c, i), s]

    because row j' of cols_w(dy) holds dy slid by j' - pw, and -(j - pw) = (kw-1-j) - pw (a same
    convolution has kw = 2*pw + 1, and kh = 2*ph + 1, which also makes dx's padding ph, pw). Here
    cols_h(x) (C*kh, N*H*W) is x unfolded along the height only (kh slides by whole image rows),
    and the edge zeros of each slab drop exactly the pairs that would cross the padding. So::

        G = cols_w(dy) @ cols_h(x)^T   (O*kw, C*kh),    dW[o, c, i, j] = G[(o, kw-1-j), (c, i)]

    One product, a long reduction to a small result (the orientation OpenBLAS runs fastest on
    these thin shapes), and no kh*kw-fold column matrix anywhere.

    Returns (chunk, bytes_per_image): chunk(n0, n1) writes dx[:, n0:n1] and returns this chunk's
    share of dW.
    """
    xp = array_module(dy, weight)
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    out_channels, _, kh, kw = weight.shape
    w_flip = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, O, kh, kw)
    w_flip_stack = w_flip.transpose(2, 0, 1, 3).reshape(kh * c, out_channels * kw)  # a small copy
    x_cm = x.transpose(1, 0, 2, 3)  # (C, N, H, W): free views when x and dy are channel-major
    dy_cm = dy.transpose(1, 0, 2, 3)

    def chunk(n0, n1):
        xs = x_cm[:, n0:n1]
        total = xs.shape[1] * h * w
        cols_w = _width_columns(dy_cm[:, n0:n1], kw, pw)  # (O*kw, M*H*W)
        z = _scratch(xp, (kh, c, total), dy.dtype, "kernel rows")
        xp.matmul(w_flip_stack, cols_w, out=z.reshape(kh * c, total))
        _add_row_shifts(dx[:, n0:n1].reshape(c, total), z, h, w, ph)

        g = cols_w @ _height_columns(xs, kh, ph).T  # (O*kw, C*kh)
        return g.reshape(out_channels, kw, c, kh)[:, ::-1].transpose(0, 2, 3, 1)

    return chunk, (out_channels * kw + 2 * kh * c) * h * w * x.dtype.itemsize  # cols_w, Z, cols_h


# ----------------------------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------------------------


def _row_dots(a, b):
    """sum_m a[c, m] * b[c, m] for each row c of two (C, M) matrices.

    A stack of C (1, M) @ (M, 1) products: one read of each matrix and no (C, M) temporary, where
    ``(a * b).sum(axis=1)`` would write and re-read a full-size product first.
    """
    xp = array_module(a, b)
    return xp.matmul(a[:, None, :], b[:, :, None]).reshape(a.shape[0])


def _row_sums(a):
    """sum_m a[c, m] for each row c of a (C, M) matrix, as the product a @ ones(M).

    The matrix-vector product runs about 3x faster than ``a.sum(axis=1)`` on long float32 rows
    here (NumPy's pairwise sum is the more careful one, but the product's float32 error stays
    at a few 1e-7 relative at these lengths: well inside what float32 training can tell apart).
    The vector of ones is made once per length and kept (a fresh one would pay first touch).
    """
    xp = array_module(a)
    key = (xp.__name__, xp.dtype(a.dtype).str, a.shape[1])
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = xp.ones(a.shape[1], dtype=a.dtype)
    return a @ ones


_ONES: dict = {}  # read-only vectors of ones for _row_sums, by (array module, dtype, length)


def batch_norm_forward(x, gamma, beta, running_mean=None, running_var=None, training=True, eps=1e-5):
    """Batch normalisation over (N, H, W) per channel (or over N for 2-D input).

    x: (N, C, H, W) or (N, C); gamma, beta, running_mean, running_var: (C,).
    Training: normalise with the batch mean and the *biased* batch variance; the cache also holds
    them, so the caller can update its running estimates (see :func:`update_running_stats`).
    Evaluation: normalise with ``running_mean`` and ``running_var``.
    y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Passes over memory (each costs about as much as a copy): mean, centre, variance (a row dot,
    no squared temporary), then y = centred * (gamma * inv_std) + beta in two in-place steps on
    one fresh array. The cache keeps the centred values; x_hat = centred * inv_std is never
    stored, backward folds inv_std into its per-channel constants.
    """
    xp = array_module(x)
    rows = channel_rows(x)  # (C, M)
    count = rows.shape[1]
    centered = xp.empty(rows.shape, dtype=rows.dtype)
    y_rows = xp.empty(rows.shape, dtype=rows.dtype)
    if training:
        mean = xp.empty(rows.shape[0], dtype=rows.dtype)
        var = xp.empty(rows.shape[0], dtype=rows.dtype)
    else:
        mean, var = running_mean, running_var
    inv_std = xp.empty(rows.shape[0], dtype=var.dtype)

    def channels(c):  # channels are independent: groups of them run on threads
        if training:
            mean[c] = _row_sums(rows[c]) / count
        xp.subtract(rows[c], mean[c][:, None], out=centered[c])
        if training:
            var[c] = _row_dots(centered[c], centered[c]) / count
        inv_std[c] = 1.0 / (var[c] + eps) ** 0.5
        xp.multiply(centered[c], (gamma[c] * inv_std[c])[:, None], out=y_rows[c])
        y_rows[c] += beta[c][:, None]

    _map_channel_groups(channels, x)
    y = _rows_to_shape(y_rows, x.shape)
    cache = (centered, gamma, inv_std, training, x.shape, mean, var)
    return y, cache


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm_forward`: returns (dx, dgamma, dbeta).

    With x_hat = (x - mean) * inv_std and M = N*H*W values per channel:
        dbeta  = sum(dy),  dgamma = sum(dy * x_hat)
    Training (batch statistics depend on x):
        dx = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)
    Evaluation (fixed statistics): dx = gamma * inv_std * dy.
    """
    centered, gamma, inv_std, training, x_shape, _, _ = cache
    xp = array_module(dy)
    dy_rows = channel_rows(dy)
    count = dy_rows.shape[1]
    dbeta = xp.empty(dy_rows.shape[0], dtype=dy_rows.dtype)
    dgamma = xp.empty(dy_rows.shape[0], dtype=dy_rows.dtype)
    dx_rows = xp.empty(dy_rows.shape, dtype=dy_rows.dtype)

    def channels(c):  # channels are independent: groups of them run on threads
        dbeta[c] = _row_sums(dy_rows[c])
        dgamma[c] = _row_dots(dy_rows[c], centered[c]) * inv_std[c]  # x_hat = centered * inv_std
        scale = (gamma[c] * inv_std[c])[:, None]
        if training:
            # The formula in four in-place passes on dx (x_hat * dgamma / M is
            # centered * (inv_std * dgamma / M)); dy is only read.
            xp.multiply(centered[c], (-(inv_std[c] * dgamma[c]) / count)[:, None], out=dx_rows[c])
            dx_rows[c] += dy_rows[c]
            dx_rows[c] -= (dbeta[c] / count)[:, None]
            dx_rows[c] *= scale
        else:
            xp.multiply(dy_rows[c], scale, out=dx_rows[c])

    _map_channel_groups(channels, dy)
    return _rows_to_shape(dx_rows, x_shape), dgamma, dbeta


def update_running_stats(running_mean, running_var, cache, momentum=0.1):
    """Update running estimates in place, as PyTorch does.

    running = (1 - momentum) * running + momentum * batch_stat, with the *unbiased* batch variance
    (times M / (M - 1)) in the running variance.
    """
    _, _, _, training, x_shape, mean, var = cache
    if not training:
        return
    count = x_shape[0] * (x_shape[2] * x_shape[3] if len(x_shape) == 4 else 1)
    unbiased = var * (count / max(count - 1, 1))
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += momentum * unbiased


def _rows_to_shape(rows, shape):
    """Inverse of :func:`channel_rows`: a (C, M) matrix back to an NCHW (or NC) view."""
    if len(shape) == 4:
        n, c, h, w = shape
        return rows.reshape(c, n, h, w).transpose(1, 0, 2, 3)
    return rows.T


# ----------------------------------------------------------------------------------------------
# Element-wise, linear, pooling
# ----------------------------------------------------------------------------------------------


def relu_forward(x):
    """y = max(x, 0), any shape. The cache is the boolean mask x > 0 (a quarter of the memory)."""
    xp = array_module(x)
    y = xp.empty_like(x)  # keeps x's memory order (channel-major stays channel-major)
    mask = xp.empty_like(x, dtype=bool)

    def part(c):  # element-wise: groups of channels run on threads (see _map_channel_groups)
        index = (slice(None), c) if x.ndim >= 2 else ...
        xp.greater(x[index], 0, out=mask[index])
        xp.maximum(x[index], 0, out=y[index])

    _map_channel_groups(part, x)
    return y, mask


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0. Returns a new array (dy is left untouched)."""
    mask = cache
    xp = array_module(dy)
    dx = xp.empty_like(dy)

    def part(c):
        index = (slice(None), c) if dy.ndim >= 2 else ...
        xp.multiply(dy[index], mask[index], out=dx[index])

    _map_channel_groups(part, dy)
    return dx


def linear_forward(x, weight, bias=None):
    """y = x @ W^T + b.  x: (N, in), weight: (out, in), bias: (out,) -> y: (N, out)."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache):
    """Returns (dx, dweight, dbias or None): dx = dy @ W, dW = dy^T @ x, db = sum of dy over N."""
    x, weight, has_bias = cache
    return dy @ weight, dy.T @ x, (dy.sum(axis=0) if has_bias else None)


def global_avg_pool_forward(x):
    """Mean over H and W.  x: (N, C, H, W) -> y: (N, C)."""
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dy, cache):
    """Each of the H*W pixels of a channel receives dy / (H*W).  dy: (N, C) -> dx: (N, C, H, W)."""
    xp = array_module(dy)
    n, c, h, w = cache
    dx = empty_channel_major(xp, (n, c, h, w), dy.dtype)
    dx[...] = (dy / (h * w))[:, :, None, None]
    return dx


# ----------------------------------------------------------------------------------------------
# The paper's parameter-free transition shortcut
# ----------------------------------------------------------------------------------------------


def shortcut_forward(x, out_channels, stride=2):
    """Subsample by ``stride`` and zero-pad the new channels (the paper's CIFAR shortcut, option A).

    x: (N, C, H, W) -> y: (N, out_channels, ceil(H/s), ceil(W/s)); y[:, :C] = x[:, :, ::s, ::s],
    the remaining out_channels - C channels are zero. No parameters.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    if out_channels < c:
        raise ValueError(f"shortcut: out_channels ({out_channels}) must be >= in_channels ({c})")
    sub = x[:, :, ::stride, ::stride]
    y = empty_channel_major(xp, (n, out_channels, sub.shape[2], sub.shape[3]), x.dtype)
    y[:, :c] = sub
    y[:, c:] = 0
    return y, (x.shape, stride)


def shortcut_backward(dy, cache):
    """dx picks the gradient of the kept channels back onto the subsampled pixels; zero elsewhere."""
    xp = array_module(dy)
    x_shape, stride = cache
    c = x_shape[1]
    dx = empty_channel_major(xp, x_shape, dy.dtype, zero=True)
    dx[:, :, ::stride, ::stride] = dy[:, :c]
    return dx


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def softmax_cross_entropy_forward(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer ``labels``, numerically stable.

    logits: (N, K) floating, labels: (N,) integers in [0, K) -> loss: 0-d array (mean over N).
    Uses log-softmax with the row maximum subtracted, so large logits cannot overflow.
    """
    xp = array_module(logits, labels)
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: expected logits of shape (N, K), got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"softmax_cross_entropy: expected labels of shape ({logits.shape[0]},), got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"softmax_cross_entropy: expected integer labels, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    # One device-to-host read of two numbers on CuPy; a label of -1 would otherwise silently
    # index the last class.
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"softmax_cross_entropy: expected labels in [0, {num_classes}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    return loss, (xp.exp(log_probs), labels)


def softmax_cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(labels)) / N."""
    xp = array_module(cache[0])
    probs, labels = cache
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[xp.arange(n), labels] -= 1
    dlogits *= dloss / n
    return dlogits
