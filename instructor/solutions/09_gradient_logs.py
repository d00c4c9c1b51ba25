"""Reference solution of notebooks/exercises/09_gradient_logs.ipynb."""
import json


def block_grad_means(metrics_path):
    """Each block's block_grad averaged over the epochs in which it ran (null: it never ran)."""
    with open(metrics_path, encoding="utf-8") as handle:
        rows = [json.loads(line)["block_grad"] for line in handle if line.strip()]
    means = []
    for values in zip(*rows):
        ran = [v for v in values if v is not None]
        means.append(sum(ran) / len(ran))
    return means
