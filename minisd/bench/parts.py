"""Parts of a network on their own: a residual block kept and dropped (the dropped-block cost), and
the single layers of ResNet-20 (convolutions, batch norm, ReLU), all on the fast tier."""
from __future__ import annotations

import statistics

import numpy

from minisd import residual
from minisd.bench.timing import BATCH, ROUNDS, interleaved, load, median_time
from minisd.bench.torch_resnet import import_torch
from minisd.kernels import fast

__all__ = ["BLOCK_SHAPES", "RESNET20_CONVS", "block_table", "layer_table"]


# (label, in channels, out channels, input size, stride): the blocks of the CIFAR ResNets
BLOCK_SHAPES = [
    ("stage1 16x32x32", 16, 16, 32, 1),
    ("stage2 32x16x16", 32, 32, 16, 1),
    ("stage3 64x8x8", 64, 64, 8, 1),
    ("transition 16->32 s2", 16, 32, 32, 2),
    ("transition 32->64 s2", 32, 64, 16, 2),
]


def block_table(rounds=ROUNDS, batch=BATCH, out=print):
    """A block's forward + backward with its gate forced on and off, interleaved: the dropped cost.

    The block is told that its input is a ReLU output (``input_is_relu_output``), as every block of
    a ResNetCifar is, and gets a non-negative input.
    """
    rng = numpy.random.default_rng(0)
    out(f"\nA dropped block vs the same block kept (batch {batch}, float32, forward + backward, gate forced "
        f"off / on, median of {rounds} interleaved rounds; {load()})")
    out(f"{'block':<22} {'kept ms':>8} {'dropped ms':>10} {'dropped/kept':>12}")
    rows = []
    for label, cin, cout, size, stride in BLOCK_SHAPES:
        block = residual.BasicBlock(cin, cout, stride, survival_prob=0.5, rng=rng)
        block.input_is_relu_output = True
        x = fast.empty_channel_major(numpy, (batch, cin, size, size), numpy.float32)
        x[...] = numpy.maximum(rng.standard_normal(x.shape), 0)  # a ReLU output
        out_size = -(-size // stride)
        dy = fast.empty_channel_major(numpy, (batch, cout, out_size, out_size), numpy.float32)
        dy[...] = rng.standard_normal(dy.shape)

        def run(gate, block=block, x=x, dy=dy):
            block.force_gate(gate)
            block(x)
            block.backward(dy)

        times = interleaved({"kept": lambda: run(True), "dropped": lambda: run(False)}, rounds, warmup=2)
        kept, dropped = statistics.median(times["kept"]), statistics.median(times["dropped"])
        rows.append((label, kept, dropped))
        out(f"{label:<22} {kept * 1e3:>8.2f} {dropped * 1e3:>10.3f} {dropped / kept:>12.2%}")
    return rows


# (name, in channels, out channels, input size, stride) of the ResNet-20 convolutions
RESNET20_CONVS = [
    ("stem 3->16", 3, 16, 32, 1),
    ("stage1 16->16", 16, 16, 32, 1),
    ("stage2 16->32 s2", 16, 32, 32, 2),
    ("stage2 32->32", 32, 32, 16, 1),
    ("stage3 32->64 s2", 32, 64, 16, 2),
    ("stage3 64->64", 64, 64, 8, 1),
]


def layer_table(rounds=ROUNDS, batch=BATCH, use_torch=True, out=print):
    """Forward and backward time and GFLOP/s of each ResNet-20 conv shape, plus BN and ReLU."""
    torch = import_torch() if use_torch else None
    rng = numpy.random.default_rng(0)
    out(f"\nLayers of ResNet-20 (batch {batch}, float32), median of {rounds}")
    head = f"{'layer':<22} {'fwd ms':>7} {'bwd ms':>7} {'fwd GF/s':>8} {'bwd GF/s':>8}"
    if torch is not None:
        head += f" {'torch f+b ms':>12} {'ratio':>6}"
    out(head)
    rows = []
    for name, cin, cout, size, stride in RESNET20_CONVS:
        x = fast.empty_channel_major(numpy, (batch, cin, size, size), numpy.float32)
        x[...] = rng.standard_normal(x.shape)
        w = (rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(numpy.float32)
        y, cache = fast.conv2d_forward(x, w, None, stride, 1)
        dy = fast.empty_channel_major(numpy, y.shape, numpy.float32)
        dy[...] = rng.standard_normal(y.shape)
        flop = 2.0 * y.size * cin * 9
        tf = median_time(lambda: fast.conv2d_forward(x, w, None, stride, 1), rounds)
        tb = median_time(lambda: fast.conv2d_backward(dy, cache), rounds)
        line = f"{name:<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f} {flop / tf / 1e9:>8.1f} {2 * flop / tb / 1e9:>8.1f}"
        if torch is not None:
            tx = torch.from_numpy(numpy.ascontiguousarray(x)).requires_grad_()
            conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            tdy = torch.from_numpy(numpy.ascontiguousarray(dy))

            def torch_fb():
                tx.grad = None
                conv.zero_grad()
                conv(tx).backward(tdy)

            tt = median_time(torch_fb, rounds)
            line += f" {tt * 1e3:>12.1f} {(tf + tb) / tt:>6.2f}"
        out(line)
        rows.append((name, tf, tb))
    for cout, size in ((16, 32), (32, 16), (64, 8)):
        x = fast.empty_channel_major(numpy, (batch, cout, size, size), numpy.float32)
        x[...] = rng.standard_normal(x.shape)
        g, b = numpy.ones(cout, numpy.float32), numpy.zeros(cout, numpy.float32)
        rm, rv = numpy.zeros(cout, numpy.float32), numpy.ones(cout, numpy.float32)
        y, cache = fast.batch_norm_forward(x, g, b, rm, rv, True)
        tf = median_time(lambda: fast.batch_norm_forward(x, g, b, rm, rv, True), rounds)
        tb = median_time(lambda: fast.batch_norm_backward(y, cache), rounds)
        out(f"{'batch norm ' + str(cout) + 'x' + str(size) + 'x' + str(size):<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f}")
        y, mask = fast.relu_forward(x)
        tf = median_time(lambda: fast.relu_forward(x), rounds)
        tb = median_time(lambda: fast.relu_backward(y, mask), rounds)
        out(f"{'relu ' + str(cout) + 'x' + str(size) + 'x' + str(size):<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f}")
    return rows
