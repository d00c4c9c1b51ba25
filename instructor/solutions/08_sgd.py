"""Reference solution of notebooks/exercises/08_sgd.ipynb."""


def sgd_step(params, grads, buffers, received, lr, momentum, nesterov, weight_decay, skip_unused):
    """One SGD step, in place, as torch.optim.SGD (dampening 0)."""
    for name, p in params.items():
        if skip_unused and not received[name]:
            continue                                   # a dropped branch: no move, buffer untouched
        g = grads[name] + weight_decay * p             # L2 decay is part of the gradient
        if momentum:
            buf = buffers.get(name)
            buffers[name] = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buffers[name] if nesterov else buffers[name]
        p -= lr * g                                    # in place: the model keeps its arrays
