"""The fast tier: the same forward/backward pairs as :mod:`minisd.functional`, built for speed.

Every pair here has the signature, the cache and the results of its reference twin in
``minisd/functional.py`` (the tests hold them equal to 1e-12 in float64 on a grid of shapes and
layouts); only *how* it computes differs. Training runs this tier by default; switch with
``minisd.kernels.use("reference")``. Read the reference first: each function here says which trick
it adds and why; what each trick measured is in ``docs/performance.md`` (section "Kernels").

The tricks, in the order a ResNet step meets them:

1. **Channel-major storage** (below): activations are NCHW to the user but stored as (C, N, H, W)
   in memory, so a convolution is one matrix product with no transposes.
2. **Chunks of images in reused buffers** (``minisd/kernels/parallel.py``): the columns of a few
   images at a time stay in cache between the unfolding and the product, on a few threads.
3. **Long contiguous slides** for stride-1 "same" unfoldings (:func:`_im2col_slide_into`).
4. **Width-only unfolding and row slides** for the 3x3 convs of every residual block
   (:func:`_same_conv_chunks`), and their backward from dy's width columns
   (:func:`_conv_grads_from_dy_columns`): no 9-fold column matrix anywhere.
5. **Row sums as matrix-vector products** in batch norm (:func:`_row_sums`), ReLU's maximum
   against a row of zeros rather than the scalar 0 (:func:`_zero_row`), and batch norm and ReLU
   on groups of channels in threads.

All of these are CPU tricks: the tier switch sends arrays on a GPU to the reference pairs
instead (:func:`minisd.kernels.running` says why). Called directly, the pairs here run on CuPy
arrays too (one chunk, no threads), only slower than the reference.

Memory layout (trick 1)
-----------------------
Every array here *is* NCHW: ``y.shape == (N, C, H, W)`` and ``y[n, c, h, w]`` is what you expect.
But the arrays that convolutions and batch norm create are stored **channel-major** in memory,
as if they were (C, N, H, W), and handed out as the transposed view. Why: a convolution is the
matrix product ``W (O, C*kh*kw) @ cols (C*kh*kw, N*H*W)``; its result (O, N*H*W) *is* channel-major,
and so is the column matrix built from a channel-major input, one contiguous slab per kernel
offset. Returning the view instead of transposing back to NCHW saves two full copies per layer
in forward and two in backward. Element-wise NumPy operations keep the memory order of their
inputs (``order="K"``), so ReLU, residual sums and batch norm stay channel-major too, and the
next convolution reads its input without a copy. :func:`channel_rows` is where the layout is used.
"""
from __future__ import annotations

from minisd.backend import array_module
from minisd.functional import (  # the caches, the geometry, and the pairs that need no trick
    BatchNormCache,
    ConvCache,
    ShortcutCache,
    conv_geometry,
    global_avg_pool_forward,
    linear_backward,
    linear_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
    update_running_stats,
)
from minisd.kernels import PAIRS, parallel
from minisd.kernels.parallel import get_num_threads, images_per_chunk, map_channel_groups, map_chunks, scratch

__all__ = ["channel_rows", "empty_channel_major", *PAIRS]  # every pair of the reference, same names


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


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
    """Fill ``cols`` (C, kh, kw, N, Ho, Wo) with the receptive fields of x (the reference's
    ``minisd.functional.im2col``, in the layout of a reused buffer)."""
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


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, Ho, Wo).
    y = W (O, C*kh*kw) @ im2col(x) (C*kh*kw, N*Ho*Wo), plus bias per output channel,
    computed a chunk of images at a time (see ``parallel.CHUNK_BYTES``). The cache keeps x, not the column
    matrix (kh*kw times larger than x): backward builds the columns it needs itself.

    A stride-1 "same" convolution (the 3x3 convs inside every residual block) computes the same
    sum in a cheaper order: see :func:`_same_conv_chunks`.
    """
    xp = array_module(x, weight)
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    _, _, sh, sw, ph, pw, ho, wo = conv_geometry(x.shape, (kh, kw), stride, padding, "conv2d")
    # (O, N, Ho, Wo): the product's natural layout, handed out as an NCHW view (module docstring).
    out = xp.empty((out_channels, n, ho, wo), dtype=x.dtype)
    threads = get_num_threads()  # device arrays: one chunk (parallel.images_per_chunk), no threads
    if _slides(h, w, ho, wo, sh, sw):
        chunk, bytes_per_image = _same_conv_chunks(x, weight, out, ph, pw)
    else:
        k = c * kh * kw
        w_rows = weight.reshape(out_channels, k)
        bytes_per_image = k * ho * wo * x.dtype.itemsize

        def chunk(n0, n1):
            xs = x[n0:n1]
            m = xs.shape[0]
            cols = _im2col_into(scratch(xp, (c, kh, kw, m, ho, wo), x.dtype), xs, kh, kw, sh, sw, ph, pw)
            # The product, written straight into this chunk's columns of the output.
            xp.matmul(w_rows, cols.reshape(k, m * ho * wo), out=out[:, n0:n1].reshape(out_channels, m * ho * wo))

    step = images_per_chunk(x, bytes_per_image)
    map_chunks(lambda n0: chunk(n0, n0 + step), range(0, n, step), threads)
    if bias is not None:
        out += bias[:, None, None, None]
    return out.transpose(1, 0, 2, 3), ConvCache(x, weight, bias is not None, stride, padding)


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
    a shape that OpenBLAS runs faster for few output channels (measured:
    docs/performance.md#width-only-unfolding-a-taller-product).
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
        z = scratch(xp, (kh, out_channels, m * h * w), x.dtype, "kernel rows")
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
    cols = scratch(array_module(x_cm), (c, 1, kw, m, h, w), x_cm.dtype)
    _im2col_slide_into(cols, x_cm, 1, kw, 0, pw)
    return cols.reshape(c * kw, m * h * w)


def _height_columns(x_cm, kh, ph):
    """im2col along the height only: (C*kh, M*H*W), row (c, i) = channel c slid by i - ph rows.

    x_cm: (C, M, H, W). Rows that slid into a neighbouring image are zero (the padding above and
    below each image). A view of the reused "height columns" scratch buffer: valid until the next
    height unfolding on this thread.
    """
    c, m, h, w = x_cm.shape
    cols = scratch(array_module(x_cm), (c, kh, 1, m, h, w), x_cm.dtype, "height columns")
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
    That is the general path (strided convolutions; the reference tier computes every convolution this way).

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
    _, _, sh, sw, ph, pw, ho, wo = conv_geometry(x.shape, (kh, kw), stride, padding, "conv2d")
    # channel-major, like every activation here
    dx = xp.empty((c, n, h, w), dtype=x.dtype) if input_grad else None
    threads = get_num_threads()  # device arrays: one chunk (parallel.images_per_chunk), no threads
    if input_grad and _slides(h, w, ho, wo, sh, sw):
        chunk, bytes_per_image = _conv_grads_from_dy_columns(x, weight, dy, dx, ph, pw)
    else:
        # Strided convolutions, and any convolution whose dx is not wanted (the stem: x's full
        # columns are C*kh*kw = 27 rows per pixel there, fewer than the dy path would unfold).
        chunk, bytes_per_image = _conv_grads_from_x_columns(x, weight, dy, dx, sh, sw, ph, pw, ho, wo)
    step = images_per_chunk(x, bytes_per_image)
    # dW is the sum of the chunks' shares, added in chunk order (deterministic with threads).
    dweight = xp.zeros(weight.shape, dtype=weight.dtype) if n == 0 else None  # an empty batch
    for share in map_chunks(lambda n0: chunk(n0, n0 + step), range(0, n, step), threads):
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
        buf = scratch(xp, (k, m * ho * wo), x.dtype)
        cols = _im2col_into(buf.reshape(c, kh, kw, m, ho, wo), xs, kh, kw, sh, sw, ph, pw).reshape(buf.shape)
        # dW^T = cols @ dY^T: the same product as dY @ cols^T, but OpenBLAS runs this orientation
        # of the thin shapes (a long reduction, a (C*kh*kw, O) result) faster (measured:
        # docs/performance.md#the-weight-gradients-product-orientation).
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
        z = scratch(xp, (kh, c, total), dy.dtype, "kernel rows")
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

    The matrix-vector product runs faster than ``a.sum(axis=1)`` on long float32 rows (measured:
    docs/performance.md#row-sums-as-a-matrix-vector-product). NumPy's pairwise sum is the more
    careful one, but the product's float32 error stays at a few 1e-7 relative at these lengths:
    well inside what float32 training can tell apart.
    The vector of ones is made once per length and kept (see :func:`_kept_row`).
    """
    return a @ _kept_row(array_module(a), a.dtype, a.shape[1], 1)


def _kept_row(xp, dtype, length, value):
    """A vector of ``length`` copies of ``value``, made once and kept: callers only ever read it.

    A fresh one at every call would pay first touch (the kernel maps and zeroes its pages).
    """
    key = (xp.__name__, xp.dtype(dtype).str, int(length), value)
    row = _KEPT_ROWS.get(key)
    if row is None:
        row = _KEPT_ROWS[key] = xp.full(int(length), value, dtype=dtype)
    return row


_KEPT_ROWS: dict = {}  # by (array module, dtype, length, value): ones for _row_sums, zeros for relu_forward
parallel._ON_CLEAR.append(_KEPT_ROWS.clear)  # clear_workspace() frees them with the scratch buffers


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

    map_channel_groups(channels, x)
    # centered goes into the cache as an NCHW view, as the reference's, so either tier's backward
    # can take either tier's cache.
    cache = BatchNormCache(_rows_to_shape(centered, x.shape), gamma, inv_std, training, x.shape, mean, var)
    return _rows_to_shape(y_rows, x.shape), cache


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm_forward`: returns (dx, dgamma, dbeta).

    With x_hat = (x - mean) * inv_std and M = N*H*W values per channel:
        dbeta  = sum(dy),  dgamma = sum(dy * x_hat)
    Training (batch statistics depend on x):
        dx = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)
    Evaluation (fixed statistics): dx = gamma * inv_std * dy.
    """
    gamma, inv_std, training, x_shape = cache.gamma, cache.inv_std, cache.training, cache.x_shape
    xp = array_module(dy)
    centered = channel_rows(cache.centered)  # a free view: the forward stored it channel-major
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

    map_channel_groups(channels, dy)
    return _rows_to_shape(dx_rows, x_shape), dgamma, dbeta


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
    """y = max(x, 0), any shape. The cache is the boolean mask x > 0 (a quarter of the memory).

    A channel-major activation (every one a ResNet makes) is maxed as (C, N*H*W) rows against a
    row of zeros, not against the scalar 0: see :func:`_zero_row`.
    """
    xp = array_module(x)
    y = xp.empty_like(x)  # keeps x's memory order (channel-major stays channel-major)
    mask = xp.empty_like(x, dtype=bool)
    if _is_channel_major(x):
        x_rows, y_rows, mask_rows = channel_rows(x), channel_rows(y), channel_rows(mask)  # free views
        zeros = _zero_row(x_rows)

        def part(c):  # element-wise: groups of channels run on threads (see parallel.map_channel_groups)
            xp.greater(x_rows[c], 0, out=mask_rows[c])
            xp.maximum(x_rows[c], zeros, out=y_rows[c])
    else:
        def part(c):
            index = (slice(None), c) if x.ndim >= 2 else ...
            xp.greater(x[index], 0, out=mask[index])
            xp.maximum(x[index], 0, out=y[index])

    map_channel_groups(part, x)
    return y, mask


def _is_channel_major(x) -> bool:
    """True for a 4-D array stored as (C, N, H, W) in memory (see :func:`empty_channel_major`)."""
    return x.ndim == 4 and x.transpose(1, 0, 2, 3).flags.c_contiguous


def _zero_row(rows):
    """A row of zeros as long as the rows of a (C, M) matrix (kept: see :func:`_kept_row`).

    Why: NumPy's ``maximum`` against the scalar 0 runs a slow loop, several times the time of a
    copy; against an array of zeros it runs its vectorised two-array loop. One row of zeros (M
    values, 512 KiB for a 16-channel 32x32 batch of 128) broadcast over the channels gives that
    loop without a full-size array of zeros to read (measured:
    docs/performance.md#relu-against-a-row-of-zeros).
    """
    return _kept_row(array_module(rows), rows.dtype, rows.shape[1], 0)


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0. Returns a new array (dy is left untouched)."""
    mask = cache
    xp = array_module(dy)
    dx = xp.empty_like(dy)

    def part(c):
        index = (slice(None), c) if dy.ndim >= 2 else ...
        xp.multiply(dy[index], mask[index], out=dx[index])

    map_channel_groups(part, dy)
    return dx


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
    return y, ShortcutCache(x.shape, stride)


def shortcut_backward(dy, cache):
    """dx picks the gradient of the kept channels back onto the subsampled pixels; zero elsewhere.

    This dense dx is most of what a dropped transition block costs. Three pixels in four are
    zero, but the batch norm backward of the block before reads dx whole, so it must exist whole:
    8 MiB written for a 16-channel 32x32 batch of 128. A buffer kept across steps, whose zeros are
    written once, measured no faster, so it did not land (measured:
    docs/performance.md#the-transition-shortcuts-backward).
    """
    xp = array_module(dy)
    x_shape, stride = cache
    c = x_shape[1]
    dx = empty_channel_major(xp, x_shape, dy.dtype, zero=True)
    dx[:, :, ::stride, ::stride] = dy[:, :c]
    return dx
