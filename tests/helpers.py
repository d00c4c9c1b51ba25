"""Shared helpers for the tests: moving data to the backend under test, and naive oracles.

Tests create their data with NumPy on the host, move it with :func:`dev` to whatever backend the
process runs on (``MINISD_BACKEND=numpy``, ``cupy-names`` or ``cupy``), and compare results after
:func:`host` (``backend.to_numpy``). So the same test files run unchanged on every backend.

The oracles below are deliberately naive (Python loops straight from the definitions): they are
slow and obviously right, and both kernel tiers (the reference, ``minisd.functional``, and the
fast tier, ``minisd.kernels.fast``) are checked against them.
"""
from __future__ import annotations

import contextlib
import os
import signal

import numpy as np

from minisd import backend, optim


def dev(a, dtype=None):
    """A host (NumPy) array moved to the current backend, optionally cast."""
    return backend.to_device(np.asarray(a), dtype=dtype)


def host(a):
    """A NumPy copy of a backend array (or of anything array-like)."""
    return np.asarray(backend.to_numpy(a))


def randn(rng, *shape, dtype="float64"):
    """Standard-normal data of ``shape`` and ``dtype``, on the current backend."""
    return dev(rng.standard_normal(shape).astype(dtype))


def away_from_zero(a, margin=0.1):
    """Push every entry at least ``margin`` away from 0, keeping its sign (for ReLU kinks)."""
    a = np.asarray(a)
    return np.where(a >= 0, a + margin, a - margin)


def randomise_batch_norm(module, rng):
    """Give every BatchNorm2d in ``module`` random gamma (magnitude 0.5 to 1.5, either sign) and
    beta, so a gradient check does not run at the special point gamma = 1, beta = 0."""
    from minisd import layers  # noqa: PLC0415

    for m in module.modules():
        if isinstance(m, layers.BatchNorm2d):
            c = m.num_features
            m.params["weight"][...] = dev(rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c))
            m.params["bias"][...] = dev(rng.normal(0.0, 0.5, c))
    return module


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------


def pad_naive(x, ph, pw):
    n, c, h, w = x.shape
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    for a in range(n):
        for b in range(c):
            for i in range(h):
                for j in range(w):
                    out[a, b, i + ph, j + pw] = x[a, b, i, j]
    return out


def conv2d_naive(x, weight, bias=None, stride=1, padding=0):
    """Cross-correlation as nested loops over (n, o, ho, wo, c, i, j), straight from the definition."""
    x, weight = np.asarray(x, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    o, c2, kh, kw = weight.shape
    assert c == c2
    xp = pad_naive(x, ph, pw)
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for a in range(n):
        for b in range(o):
            for p in range(ho):
                for q in range(wo):
                    total = 0.0 if bias is None else float(bias[b])
                    for ch in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                total += xp[a, ch, p * sh + i, q * sw + j] * weight[b, ch, i, j]
                    y[a, b, p, q] = total
    return y


def im2col_naive(x, kernel_size, stride=1, padding=0):
    """Columns as loops: row (c, i, j), column (n, ho, wo), as the docstring of F.im2col says."""
    x = np.asarray(x)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    n, c, h, w = x.shape
    xp = pad_naive(x, ph, pw)
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    cols = np.zeros((c * kh * kw, n * ho * wo), dtype=x.dtype)
    for ch in range(c):
        for i in range(kh):
            for j in range(kw):
                row = (ch * kh + i) * kw + j
                for a in range(n):
                    for p in range(ho):
                        for q in range(wo):
                            cols[row, (a * ho + p) * wo + q] = xp[a, ch, p * sh + i, q * sw + j]
    return cols


def batch_norm_naive(x, gamma, beta, eps=1e-5, mean=None, var=None):
    """y = gamma (x - mean) / sqrt(var + eps) + beta per channel, statistics over every axis but 1.

    mean/var None: the batch mean and the *biased* batch variance, computed with explicit loops.
    Returns (y, batch_mean, biased_var, unbiased_var).
    """
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    per_channel = [np.moveaxis(x, 1, 0)[k].ravel() for k in range(c)]
    bmean = np.array([sum(v) / len(v) for v in per_channel])
    bvar = np.array([sum((t - bmean[k]) ** 2 for t in v) / len(v) for k, v in enumerate(per_channel)])
    uvar = np.array([sum((t - bmean[k]) ** 2 for t in v) / (len(v) - 1) for k, v in enumerate(per_channel)])
    m = bmean if mean is None else np.asarray(mean, dtype=np.float64)
    s = bvar if var is None else np.asarray(var, dtype=np.float64)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = np.asarray(gamma).reshape(shape) * (x - m.reshape(shape)) / np.sqrt(s.reshape(shape) + eps) \
        + np.asarray(beta).reshape(shape)
    return y, bmean, bvar, uvar


def count_calls(obj, method):
    """Wrap ``obj.method`` (on the instance) so every call is counted; returns the counter list."""
    calls = []
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(obj, method, wrapped)
    return calls


def assert_check(result):
    """Assert a GradcheckResult passed, showing its readable report when it did not."""
    assert result.passed, result.report()
    assert result.errors, "the check compared nothing"
    return result


# ------------------------------------------------------------------------------------------------
# Headless Chromium (tests/test_browser.py, tests/test_stepper_html.py, tests/test_book.py)
# ------------------------------------------------------------------------------------------------


def browser_missing(modules=("selenium",)) -> list[str]:
    """What a real-browser test lacks: Debian's chromium and chromium-driver, and Python ``modules``."""
    import importlib.util  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    missing = [name for name, program in (("chromium", "chromium"), ("chromium-driver", "chromedriver"))
               if not (shutil.which(program) or (program == "chromium" and shutil.which("chromium-browser")))]
    return missing + [m for m in modules if importlib.util.find_spec(m) is None]


def skip_without_browser(modules=("selenium",), what="browser test", extra="browser") -> None:
    """Skip the calling test module in one line when a browser test cannot run (fail instead under
    MINISD_REQUIRE_BROWSER=1, as .ci/run sets)."""
    import os  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    missing = browser_missing(modules)
    if not missing:
        return
    reason = (f"{what} needs chromium, chromium-driver and the '{extra}' extra (missing: {', '.join(missing)}); "
              "see README, 'Run the tests'")
    if os.environ.get("MINISD_REQUIRE_BROWSER") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@contextlib.contextmanager
def chromium(root: str, network_log: bool = False):
    """Headless Chromium under Selenium, its profile in ``root`` (a context manager). network_log:
    keep the DevTools network events (read them with :func:`requested_urls`)."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.options import Options  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={os.path.join(root, '.chromium')}",
                     "--window-size=1600,1400", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    if network_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL our pages asked for since the last call (DevTools ``Network.requestWillBeSent``),
    leaving out the browser's own start page (``chrome://`` documents), which loads before ours."""
    import json  # noqa: PLC0415

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            if not params.get("documentURL", "").startswith("chrome://"):
                urls.append(params["request"]["url"])
    return urls


def non_white_share(image) -> float:
    """The share of pixels of a PIL image that are drawn (not near white)."""
    rgb = np.asarray(image.convert("RGB"))
    return float((rgb.min(axis=2) < 235).mean())


def interrupt_after_steps(monkeypatch, after_steps):
    """Send ourselves Ctrl-C right after the optimizer's ``after_steps``-th step (monkeypatch.undo() ends it)."""
    original = optim.SGD.step
    calls = {"n": 0}

    def step(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == after_steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optim.SGD, "step", step)
