"""Train the declared plan of experiments (issue 21, notebook 8) and store each finished run in the
repository: resumable, one thread per job, as many jobs side by side as asked.

    python scripts/run_experiments.py --list                          # the plan: done, pending, time
    python scripts/run_experiments.py --plan smalldata sweep --jobs 2 # train what is not stored yet
    python scripts/run_experiments.py --plan sweep --exclude wallclock --dry-run

Each run is trained by minisd's own trainer (``minisd.training.fit``; ``training.resume`` after an
interruption) in a worker process of its own, started with ``OPENBLAS_NUM_THREADS=1`` and
``MINISD_NUM_THREADS=1`` in its environment, so it has set one thread before NumPy is imported
(two runs with multi-threaded OpenBLAS on two cores slow each other down by an order of magnitude:
README, "Two runs at once"). The run folder with its checkpoints lives in a scratch folder outside
the repository (``--scratch``, default /work/scratch-runs). When the run has finished, its
``metrics.jsonl``, ``settings.json`` and ``summary.json`` (minisd's files, as written) and a
``runner.json`` (the command, machine, dates and sessions) are copied, all at once, to
``experiments/runs/<name>/``; checkpoints are never stored there.

Started again, the runner skips every stored run and resumes an interrupted one from its last
checkpoint (bit for bit the run that was never stopped). Ctrl-C (or SIGTERM) is passed on to the
workers, which save a checkpoint at their next safe point and stop.

A run's name says what it is: ``<dataset>-resnet<depth>-<schedule>-p<p_L>-train<N|all>-e<epochs>-seed<seed>``
(``none`` is constant depth, with p_L = 1). A run that belongs to several groups (the sweep's
p_L = 0.5 points are the wall-clock group's and the uniform group's runs) is trained once.

Every invocation that trains rewrites ``experiments/README.md``: the hypotheses (stated before any
run), the settings, the plan with what is stored, and the commands, machines and dates that made
the stored runs. ``scripts/experiment_summary.py`` prints the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "experiments")
DEFAULT_SCRATCH = "/work/scratch-runs"
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "MINISD_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}

sys.path.insert(0, ROOT)  # minisd from this checkout, whichever copy the environment installed

from minisd import models, residual  # noqa: E402
from minisd.experiments import RUNNER_FILE, STORED_FILES  # noqa: E402  (what a stored run holds)
from minisd.training import Settings, TrainingInterrupted, fit, resume  # noqa: E402
from minisd.training.run_folder import RunFolderError, check_not_in_use  # noqa: E402

# ---- the plan -------------------------------------------------------------------------------------

DEEP_LR = 0.025          # the paper's 0.1 at batch 128, scaled to batches of 32 (README, "Training")
DEEP_LR_FROM_DEPTH = 56  # ResNet-110 breaks down in its first epoch at 0.1 with batches of 32
EPOCHS = 30              # notebook 8's runs, which these extend
SEEDS = (0, 1, 2)
SWEEP_P = (0.2, 0.35, 0.5, 0.65, 0.8)
SMALLDATA_EPOCHS = 60
# 5 seed pairs would let the exact one-sided sign-flip test reach p = 1/32 at best (only when every
# seed agrees); 8 pairs reach 1/256, so one seed against the others does not decide the outcome.
SMALLDATA_SEEDS = tuple(range(8))
DEEP_SEEDS = (0, 1)
# ResNet-1202 with batches of 32 on the digits, one thread: notebook 8's step-time fit (2.9 ms fixed +
# 1.67 ms per block, quiet machine) gives 1.0 s per step, 40 steps and ~13 s of evaluation per epoch:
# 30 epochs take ~27 min with constant depth and ~22 min with linear decay, the ~25 min per run the
# plan allows, and the same 30 epochs as the ResNet-110 runs they are compared with. (Measured on
# 2026-12-05 beside three other programs on two cores: 3.4 s per step, so three times that.)
DEEP_EPOCHS = 30
# He et al. (2016) warmed their 110-layer CIFAR net up at lr / 10 for about 400 steps: here one epoch.
DEEP_WARMUP_EPOCHS = 1
DEEP_LOW_LR = 0.0025     # a tenth of ResNet-110's: a 2-epoch probe of ResNet-1202 learned at this rate
DIGITS_TRAIN_IMAGES = 1257   # minisd's fixed digits split: 1257 train, 180 validation, 360 test
DIGITS_EVAL_IMAGES = 180 + 360


def learning_rate(depth: int) -> float:
    """0.025 for ResNet-56 and deeper (the paper's step per example at batches of 32), else minisd's 0.1."""
    return DEEP_LR if depth >= DEEP_LR_FROM_DEPTH else Settings().lr


def blocks(depth: int) -> int:
    return 3 * models.blocks_per_stage(depth)


def matched_uniform_p(depth: int = 110, final_survival: float = 0.5) -> float:
    """The uniform p that runs as many blocks on average as linear decay to p_L: the mean of its p_l."""
    return statistics.fmean(residual.linear_decay(blocks(depth), final_survival))


def format_p(p: float) -> str:
    return f"{p:.4f}".rstrip("0").rstrip(".")


def run_name(s: Settings) -> str:
    subset = "all" if s.train_subset is None else str(s.train_subset)
    warmup = f"-warmup{s.warmup_epochs}" if s.warmup_epochs else ""
    lr = "" if s.lr == learning_rate(s.depth) else f"-lr{s.lr:g}"      # named only where it is not the plan's rule
    return (f"{s.dataset}-resnet{s.depth}-{s.schedule}-p{format_p(s.final_survival)}-train{subset}"
            f"-e{s.epochs}{lr}{warmup}-seed{s.seed}")


def planned(depth, schedule, final_survival=0.5, *, seed, epochs=EPOCHS, train_subset=None,
            warmup_epochs=0, lr=None) -> Settings:
    """minisd's Settings as they are (digits, batch 32, the paper's optimizer, step schedule), with the
    learning rate for the depth unless ``lr`` is given; constant depth is schedule "none" with p_L = 1."""
    if schedule == "none":
        final_survival = 1.0
    return Settings(depth=depth, schedule=schedule, final_survival=final_survival, epochs=epochs, seed=seed,
                    train_subset=train_subset, lr=learning_rate(depth) if lr is None else lr,
                    warmup_epochs=warmup_epochs).validate()


def build_plan(deep_epochs: int = DEEP_EPOCHS) -> dict[str, list[Settings]]:
    """group -> its runs, in the order they run."""
    matched = matched_uniform_p()
    quarter = DIGITS_TRAIN_IMAGES // 4
    return {
        "wallclock": [planned(110, schedule, p, seed=seed) for schedule, p in
                      (("none", 1.0), ("linear", 0.5), ("uniform", matched)) for seed in SEEDS],
        "uniform": [planned(110, "uniform", p, seed=seed) for p in (0.5, matched) for seed in SEEDS],
        "sweep": [planned(110, rule, p, seed=seed) for rule in ("linear", "uniform") for p in SWEEP_P
                  for seed in SEEDS],
        "smalldata": [planned(110, schedule, 0.5, seed=seed, epochs=SMALLDATA_EPOCHS, train_subset=quarter)
                      for seed in SMALLDATA_SEEDS for schedule in ("none", "linear")],
        "deep1202": [planned(1202, schedule, 0.5, seed=seed, epochs=deep_epochs)
                     for seed in DEEP_SEEDS for schedule in ("none", "linear")],
        "deep1202warmup": [planned(1202, schedule, 0.5, seed=seed, epochs=deep_epochs, warmup_epochs=DEEP_WARMUP_EPOCHS)
                           for seed in DEEP_SEEDS for schedule in ("none", "linear")],
        "deep1202lowlr": [planned(1202, schedule, 0.5, seed=seed, epochs=deep_epochs, lr=DEEP_LOW_LR)
                          for seed in DEEP_SEEDS for schedule in ("none", "linear")],
        # A check of the whole pipeline in seconds (the tests run it): not an experiment.
        "smoke": [planned(8, schedule, 0.5, seed=seed, epochs=2, train_subset=64)
                  for seed in (0, 1) for schedule in ("none", "linear")],
    }


GROUP_TEXT = {
    "wallclock": "ResNet-110: constant depth, linear decay p_L = 0.5, uniform at matched expected depth; 3 seeds. "
                 "Timing-sensitive: run it alone on a quiet machine.",
    "uniform": "ResNet-110: uniform at equal p_L (0.5) and at matched expected depth; 3 seeds",
    "sweep": "ResNet-110: p_L in {0.2, 0.35, 0.5, 0.65, 0.8}, linear decay and uniform; 3 seeds",
    "smalldata": f"ResNet-110 on a quarter of the training images ({DIGITS_TRAIN_IMAGES // 4}), "
                 f"{SMALLDATA_EPOCHS} epochs: constant depth against linear decay p_L = 0.5; "
                 f"{len(SMALLDATA_SEEDS)} seeds",
    "deep1202": "ResNet-1202: constant depth against linear decay p_L = 0.5; 2 seeds",
    "deep1202warmup": "ResNet-1202 as deep1202, with the first epoch at lr / 10 (He et al.'s warm-up); 2 seeds",
    "deep1202lowlr": f"ResNet-1202 as deep1202 at lr {DEEP_LOW_LR} throughout (a tenth of ResNet-110's); 2 seeds",
    "smoke": "ResNet-8, 64 images, 2 epochs: a check of the pipeline, not an experiment",
}

HYPOTHESES = f"""\
Stated before any of these runs was made. The test-error metric throughout is the test error of the
best-validation checkpoint (`summary.json` `test_acc`, the paper's protocol); the last epoch's test
error is reported beside it. The validation split has 180 images (one image is 0.56%), the test
split 360 (0.28%), so the choice of checkpoint is noisy.

1. **wallclock.** Training ResNet-110 for {EPOCHS} epochs takes less wall-clock time with stochastic
   depth, by about the fraction of blocks skipped *in training steps*: linear decay to p_L = 0.5 runs
   {sum(residual.linear_decay(54, 0.5)):.2f} of 54 blocks on average (25.5% skipped), uniform at matched expected depth
   (p = {format_p(matched_uniform_p())}) the same number. The whole run saves less than 25.5%, because the fixed part of a step
   and the per-epoch evaluation (every block, 540 images) do not shrink; linear decay and matched uniform
   take the same time within the spread over seeds.
2. **uniform.** The paper finds linear decay better than uniform survival. At equal p_L = 0.5 uniform
   runs 27 of 54 blocks against linear decay's 40.25, so that comparison mixes the schedule's shape with
   the amount dropped. At matched expected depth we expect the gap to shrink to within the spread over
   seeds on the digits (the shape itself making no difference we can measure here); if linear decay is
   still better by more than the spread, the shape matters.
3. **sweep.** Uniform survival's test error rises as p_L falls (it drops more blocks), while linear
   decay stays within the seed spread of constant depth over p_L = 0.2 ... 0.8 (as notebook 8's
   single-seed points suggested).
4. **smalldata** (the regularisation test). With a quarter of the training images
   ({DIGITS_TRAIN_IMAGES // 4}) and {SMALLDATA_EPOCHS} epochs, ResNet-110 overfits more, and stochastic depth's
   regularisation lowers the test error: linear decay (p_L = 0.5) has a lower best-validation test
   error than constant depth, paired by seed (the same seed gives both the same initial weights and
   the same batches). Test: exact one-sided sign-flip permutation test over the {len(SMALLDATA_SEEDS)} seed pairs, statistic
   the mean of (constant - linear), p = share of the 2^{len(SMALLDATA_SEEDS)} sign patterns whose mean is at least the
   observed one; significant at p < 0.05. The same test on the last epoch's error is reported as
   secondary. The outcome is reported either way.
5. **deep1202** (the paper: constant depth at 1202 layers is worse than at 110, stochastic depth at
   1202 is better than constant depth at 1202). With {DEEP_EPOCHS} epochs on the digits we expect constant-depth
   ResNet-1202 no better than constant-depth ResNet-110, and linear decay at 1202 no worse than constant
   depth at 1202; with 2 seeds, only a difference larger than both runs' spread is read as one.
6. **deep1202warmup** (added on 2026-12-06, after deep1202's two seed-0 runs had been seen, before
   any run of this group). Both seed-0 runs of deep1202 blew up in their first epoch (training loss 53
   with constant depth, 31 with linear decay) and then stayed at chance (about 10% accuracy) for all
   {DEEP_EPOCHS} epochs, while a probe of 2 epochs at lr 0.0025 learned (30% validation accuracy after
   epoch 2). Diagnosis to test: the first steps at lr 0.025 are too large for 600 blocks (at
   initialisation the gradient at the stem of ResNet-1202 is about 15 times ResNet-110's, notebook 8).
   With He et al.'s warm-up (the first epoch at lr / 10, then the same schedule) ResNet-1202 trains
   with both schedules: a best-validation test error far below chance (under 20%) for every run. If
   it does, hypothesis 5 is read on these runs.
7. **deep1202lowlr** (added on 2026-12-06, after the first 4 epochs of deep1202warmup's seed-0 runs,
   before any run of this group). With the warm-up both seed-0 runs learned in the warm-up epoch
   (validation accuracy 14% and 24%) and blew up again as soon as the learning rate returned to
   0.025 (training loss 42 and 27 in epoch 2). So the rate itself is too large for ResNet-1202 here,
   not only the first steps. At lr {DEEP_LOW_LR} throughout (the step schedule's drops as before)
   ResNet-1202 trains with both schedules: a best-validation test error under 20% for every run.
   Then hypothesis 5 on these runs: constant depth at 1202 no better than constant-depth ResNet-110
   (whose runs had lr 0.025, so that comparison mixes depth with the learning rate), and linear decay at
   1202 no worse than constant depth at 1202 (the same learning rate: a clean comparison); with 2 seeds
   only a difference larger than both runs' spread is read as one.
"""


def unique_runs(plan: dict[str, list[Settings]], groups, exclude=()) -> list[Settings]:
    """The runs of ``groups`` in order, each name once, leaving out runs that also belong to ``exclude``."""
    excluded = {run_name(s) for g in exclude for s in plan[g]}
    seen: dict[str, Settings] = {}
    for group in groups:
        for settings in plan[group]:
            name = run_name(settings)
            if name in seen and seen[name] != settings:
                raise ValueError(f"plan: two different runs are named {name}")
            if name not in excluded:
                seen.setdefault(name, settings)
    return list(seen.values())


def check_plan_names(plan) -> None:
    """Two runs with one name and different settings would overwrite each other."""
    by_name: dict[str, Settings] = {}
    for settings in (s for runs in plan.values() for s in runs):
        other = by_name.setdefault(run_name(settings), settings)
        if other != settings:
            raise ValueError(f"plan: two different runs are named {run_name(settings)}")


# ---- time estimates -------------------------------------------------------------------------------

# Notebook 8's step-time fit (ResNet-110, batch 32, one thread, quiet machine): a step costs a fixed
# part plus the same amount per block that ran. Evaluation: what its stored runs spent outside the
# training steps, (150 s - 1200 steps x 93 ms) / 30 epochs / (540 images x 54 blocks).
STEP_FIXED_S = 2.9e-3
STEP_PER_BLOCK_S = 1.67e-3
EVAL_PER_IMAGE_BLOCK_S = 43e-6


def modelled_seconds(s: Settings) -> float:
    """Wall time of a run from the cost model (quiet machine, one thread)."""
    num_blocks = blocks(s.depth)
    active = sum(residual.make_schedule(s.schedule, num_blocks, s.final_survival))
    steps = math.ceil((s.train_subset or DIGITS_TRAIN_IMAGES) / s.batch_size)
    step_s = (STEP_FIXED_S + STEP_PER_BLOCK_S * active) * s.batch_size / 32
    return s.epochs * (steps * step_s + EVAL_PER_IMAGE_BLOCK_S * DIGITS_EVAL_IMAGES * num_blocks)


def calibration(runs_dir: str, plan) -> tuple[float, int]:
    """(median of measured / modelled wall time over the stored runs of the plan, how many), or (1, 0)."""
    ratios = []
    experiments = {run_name(s): s for group, runs in plan.items() if group != "smoke" for s in runs}
    for settings in experiments.values():
        summary = read_json(os.path.join(runs_dir, run_name(settings), "summary.json"))
        if summary and summary.get("wall_time_s"):
            ratios.append(summary["wall_time_s"] / modelled_seconds(settings))
    return (statistics.median(ratios), len(ratios)) if ratios else (1.0, 0)


def format_duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


# ---- state of a run -------------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def is_stored(runs_dir: str, name: str) -> bool:
    folder = os.path.join(runs_dir, name)
    return all(os.path.isfile(os.path.join(folder, f)) for f in STORED_FILES + (RUNNER_FILE,))


def epochs_done(scratch_dir: str) -> int:
    """Finished epochs in a scratch run folder (lines of its metrics.jsonl), 0 if none."""
    try:
        with open(os.path.join(scratch_dir, "metrics.jsonl"), encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def state(runs_dir, scratch, settings) -> str:
    name = run_name(settings)
    if is_stored(runs_dir, name):
        return "done"
    done = epochs_done(os.path.join(scratch, name))
    try:
        check_not_in_use(os.path.join(scratch, name))
    except RunFolderError:
        return f"running ({done}/{settings.epochs} epochs)"
    return f"partial ({done}/{settings.epochs} epochs)" if done else "pending"


def remaining_fraction(runs_dir, scratch, settings) -> float:
    name = run_name(settings)
    if is_stored(runs_dir, name):
        return 0.0
    return 1.0 - epochs_done(os.path.join(scratch, name)) / settings.epochs


# ---- the machine ----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    import numpy  # noqa: PLC0415

    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__}


def describe_machine(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['system']}, Python {m['python']}, NumPy {m['numpy']}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Unix
        return None


# ---- the worker: one run, in its own process ------------------------------------------------------

def settings_mismatch(planned_settings: Settings, saved: dict) -> str | None:
    """The first setting the plan fixes that the scratch folder's run has otherwise, in words."""
    for key, value in planned_settings.to_dict().items():
        if value is not None and saved.get(key) != value:
            return f"{key} is {saved.get(key)!r} there, the plan says {value!r}"
    return None


def work(settings: Settings, scratch_dir: str, store_dir: str, command: str, jobs: int) -> None:
    """Train (or resume) one run in ``scratch_dir`` and store its files in ``store_dir``."""
    saved = read_json(os.path.join(scratch_dir, "settings.json"))
    if saved is not None and (why := settings_mismatch(settings, saved)):
        raise RunFolderError(f"{scratch_dir} holds another run ({why}); remove that folder or choose another --scratch")
    sessions_path = os.path.join(runner_folder(scratch_dir), "sessions.jsonl")
    has_run = saved is not None or any(os.path.exists(os.path.join(scratch_dir, n)) for n in ("last.npz", "best.npz"))
    session = {"started": now(), "load_average_start": load_average(), "resumed": has_run, "command": command,
               "jobs": jobs, "threads": {k: os.environ.get(k) for k in ONE_THREAD}}
    t0 = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    result = resume(scratch_dir, log=log, progress=False) if has_run else fit(settings, scratch_dir, log, False)
    session.update(finished=now(), load_average_end=load_average(), seconds=round(time.perf_counter() - t0, 2))
    with open(sessions_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(session) + "\n")
    with open(sessions_path, encoding="utf-8") as handle:
        sessions = [json.loads(line) for line in handle if line.strip()]
    info = {"name": os.path.basename(store_dir), "command": command, "machine": machine(), "jobs": jobs,
            "wall_time_s": result.wall_time_s, "sessions": sessions,
            "note": "wall_time_s (as summary.json) adds up the sessions' training time; "
                    "time between sessions is not counted"}
    store(scratch_dir, store_dir, info)


def store(scratch_dir: str, store_dir: str, info: dict) -> None:
    """Copy the run's files to ``store_dir`` all at once: into a temporary folder, then renamed."""
    parent = os.path.dirname(os.path.abspath(store_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(store_dir)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in STORED_FILES:
        shutil.copyfile(os.path.join(scratch_dir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, RUNNER_FILE), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    if os.path.exists(store_dir):
        shutil.rmtree(store_dir)
    os.rename(tmp, store_dir)


def worker_main(args) -> int:
    settings = Settings.from_dict(read_json(args.worker_settings)).validate()
    try:
        work(settings, args.worker_scratch, args.worker_store, args.worker_command, args.jobs)
    except TrainingInterrupted as exc:
        print(f"worker: {exc}", flush=True)
        return 130
    return 0


# ---- the runner -----------------------------------------------------------------------------------

@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log_path: str
    started: float
    log_handle: object = None


LEGACY_FILES = {"planned-settings.json": "planned-settings.json", "worker.log": "worker.log",
                "runner-sessions.jsonl": "sessions.jsonl"}  # where earlier runners kept them: in the run folder


def runner_folder(scratch_dir: str) -> str:
    """The runner's own files for a run (planned settings, worker log, sessions) sit beside the
    run folder, never in it: minisd uses a folder only if it holds nothing minisd did not write.
    Files an earlier runner left inside the run folder move out here."""
    folder = scratch_dir.rstrip(os.sep) + ".runner"
    os.makedirs(folder, exist_ok=True)
    for old, new in LEGACY_FILES.items():
        if os.path.isfile(os.path.join(scratch_dir, old)) and not os.path.exists(os.path.join(folder, new)):
            os.replace(os.path.join(scratch_dir, old), os.path.join(folder, new))
    return folder


def start_worker(settings, runs_dir, scratch, command, jobs) -> Worker:
    name = run_name(settings)
    scratch_dir = os.path.join(scratch, name)
    settings_path = os.path.join(runner_folder(scratch_dir), "planned-settings.json")
    with open(settings_path, "w", encoding="utf-8") as handle:
        json.dump(settings.to_dict(), handle, indent=2)
    env = dict(os.environ, **ONE_THREAD)  # in the worker's environment before it imports NumPy
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    log_path = os.path.join(runner_folder(scratch_dir), "worker.log")
    log_handle = open(log_path, "a", encoding="utf-8")  # noqa: SIM115  (closed when the worker ends)
    argv = [sys.executable, os.path.abspath(__file__), "--jobs", str(jobs), "--worker-settings", settings_path,
            "--worker-scratch", scratch_dir, "--worker-store", os.path.join(runs_dir, name),
            "--worker-command", command]
    # A session of its own: a Ctrl-C at the terminal reaches the runner only, which passes one SIGINT
    # on (a second one would make the worker quit without saving).
    process = subprocess.Popen(argv, env=env, stdout=log_handle, stderr=subprocess.STDOUT, cwd=ROOT,
                               start_new_session=True)
    return Worker(name, process, log_path, time.perf_counter(), log_handle)


def say(line) -> None:
    print(f"[{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {line}", flush=True)


def finished_line(runs_dir, name, seconds) -> str:
    folder = os.path.join(runs_dir, name)
    summary = read_json(os.path.join(folder, "summary.json")) or {}
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        lines = [json.loads(x) for x in handle if x.strip()]
    return (f"done {name}: test error {100 * (1 - summary['test_acc']):.2f}% (best-validation checkpoint, epoch "
            f"{summary['best_epoch']}), {100 * (1 - lines[-1]['test_acc']):.2f}% (last epoch); run "
            f"{summary['wall_time_s']:.0f} s, this session {seconds:.0f} s")


def run_all(todo, runs_dir, scratch, jobs, command, readme_writer) -> int:
    """Train ``todo`` with ``jobs`` workers side by side; returns the number of runs that failed."""
    pending, running, failed = list(todo), [], 0
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            while pending and len(running) < jobs and not interrupted:
                settings = pending.pop(0)
                name = run_name(settings)
                try:
                    check_not_in_use(os.path.join(scratch, name))
                except RunFolderError:
                    say(f"skip {name}: another process is training it")
                    continue
                worker = start_worker(settings, runs_dir, scratch, command, jobs)
                running.append(worker)
                say(f"start {name} ({state(runs_dir, scratch, settings)}; pid {worker.process.pid}; "
                    f"log {worker.log_path})")
            time.sleep(0.2)
            for worker in [w for w in running if w.process.poll() is not None]:
                running.remove(worker)
                worker.log_handle.close()
                seconds = time.perf_counter() - worker.started
                if worker.process.returncode == 0 and is_stored(runs_dir, worker.name):
                    say(finished_line(runs_dir, worker.name, seconds))
                    readme_writer()
                else:
                    failed += 1
                    say(f"FAILED {worker.name} (exit code {worker.process.returncode}); its log: {worker.log_path}")
    except KeyboardInterrupt:
        interrupted = True
        say(f"stopping: {len(running)} worker(s) save a checkpoint and stop; run the same command to resume")
        for worker in running:
            worker.process.send_signal(signal.SIGINT)
        for worker in running:
            worker.process.wait()
            worker.log_handle.close()
        return -1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def plan_table(plan, groups, runs_dir, scratch, exclude=()) -> list[str]:
    """One line per run of ``groups`` (shared runs marked), then totals with time estimates."""
    ratio, calibrated_on = calibration(runs_dir, plan)
    excluded = {run_name(s) for g in exclude for s in plan[g]}
    lines, counted = [], set()
    for group in groups:
        runs = plan[group]
        remaining = sum(modelled_seconds(s) * remaining_fraction(runs_dir, scratch, s) for s in runs
                        if run_name(s) not in counted and run_name(s) not in excluded) * ratio
        done = sum(is_stored(runs_dir, run_name(s)) for s in runs)
        lines.append(f"{group}: {GROUP_TEXT[group]}")
        lines.append(f"  {len(runs)} runs, {done} stored; left to train here: ~{format_duration(remaining)}")
        for s in runs:
            name = run_name(s)
            note = (" (left out: --exclude)" if name in excluded
                    else " (trained with an earlier group)" if name in counted else "")
            lines.append(f"    {state(runs_dir, scratch, s):<24} {name}  lr {s.lr}  "
                         f"~{format_duration(modelled_seconds(s) * ratio)}{note}")
            counted.add(name)
    source = (f"scaled by {ratio:.2f}, the median of measured / modelled over {calibrated_on} stored runs"
              if calibrated_on else "a quiet machine, one thread per job; no stored run to calibrate on yet")
    lines.append(f"time estimates: notebook 8's step-time fit plus evaluation ({source}); with --jobs N, "
                 "divide by N at best")
    return lines


def readme_text(plan, runs_dir, scratch) -> str:
    """experiments/README.md: hypotheses, settings, the plan with what is stored, the commands."""
    stored = sorted(n for n in os.listdir(runs_dir) if is_stored(runs_dir, n)) if os.path.isdir(runs_dir) else []
    made_by: dict[tuple, list] = {}
    for name in stored:
        info = read_json(os.path.join(runs_dir, name, RUNNER_FILE)) or {}
        key = (info.get("command", "?"), describe_machine(info["machine"]) if "machine" in info else "?")
        finished = [s.get("finished", "?") for s in info.get("sessions", [])]
        made_by.setdefault(key, []).append((name, finished[-1] if finished else "?"))
    groups = [g for g in plan if g != "smoke"]
    parts = [
        "# Experiments of notebook 8",
        "",
        "Generated by `scripts/run_experiments.py` (do not edit by hand: it rewrites this file each time it "
        "stores a run). `python scripts/experiment_summary.py` prints the tables from the stored runs.",
        "",
        "Each `runs/<name>/` holds minisd's `metrics.jsonl` (one line per epoch, with its `time_s`), "
        "`settings.json` and `summary.json` (test accuracy of the best-validation checkpoint and the run's "
        "`wall_time_s`) as the trainer wrote them, and `runner.json` (the command, the machine, and each "
        "session's dates and load average). Checkpoints stay in the scratch folder and are not stored. "
        "Name: `<dataset>-resnet<depth>-<schedule>-p<p_L>-train<N|all>-e<epochs>-seed<seed>`; schedule "
        "`none` is constant depth.",
        "",
        "## Settings",
        "",
        f"minisd's `Settings` as they are: the digits (1257 training, 180 validation, 360 test images of 8x8), "
        f"batches of 32, SGD with Nesterov momentum 0.9, weight decay 1e-4, learning rate divided by 10 at 50% "
        f"and 75% of the epochs, shifts of up to 1 pixel; {EPOCHS} epochs unless the group says otherwise. "
        f"Learning rate {DEEP_LR} for depths >= {DEEP_LR_FROM_DEPTH} (the paper's 0.1 at batch 128 scaled to "
        f"batch 32; ResNet-110 breaks down in its first epoch at 0.1, README \"Training\"), as in notebook 8, "
        f"whose runs these extend. Every run trains in its own process with one thread "
        f"(`OPENBLAS_NUM_THREADS=1 MINISD_NUM_THREADS=1`).",
        "",
        "## Hypotheses",
        "",
        HYPOTHESES,
        "## Plan",
        "",
        "```",
        *plan_table(plan, groups, runs_dir, scratch),
        "```",
        "",
        "## Commands that made the stored runs",
        "",
    ]
    if not made_by:
        parts.append("None stored yet.")
    for (command, machine_text), names in made_by.items():
        dates = sorted(d for _, d in names)
        parts += [f"- `{command}` on {machine_text}: {len(names)} runs, finished {dates[0]} ... {dates[-1]}"]
    parts += ["", f"Generated {now()} on {describe_machine(machine())}.", ""]
    return "\n".join(parts)


def write_readme(out, plan, runs_dir, scratch) -> None:
    path = os.path.join(out, "README.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(readme_text(plan, runs_dir, scratch))
    os.replace(tmp, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    plan_groups = list(build_plan())
    parser.add_argument("--plan", nargs="+", choices=plan_groups, metavar="GROUP",
                        help=f"groups to train, in this order: {', '.join(plan_groups)} (default: all but smoke)")
    parser.add_argument("--exclude", nargs="+", choices=plan_groups, default=[], metavar="GROUP",
                        help="leave out the runs that also belong to these groups (e.g. wallclock, to time them "
                             "later on a quiet machine)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes side by side, one thread each (1)")
    parser.add_argument("--list", action="store_true", help="print the plan: done, pending, estimated time")
    parser.add_argument("--dry-run", action="store_true", help="print what would be trained; train and write nothing")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="experiments folder: runs/ and README.md (default: experiments/ of this checkout)")
    parser.add_argument("--scratch", default=DEFAULT_SCRATCH,
                        help=f"folder for the run folders with checkpoints, outside the repository ({DEFAULT_SCRATCH})")
    parser.add_argument("--deep-epochs", type=int, default=DEEP_EPOCHS,
                        help=f"epochs of the ResNet-1202 runs ({DEEP_EPOCHS}: ~25 min per run on a quiet machine)")
    for hidden in ("--worker-settings", "--worker-scratch", "--worker-store", "--worker-command"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.deep_epochs < 1:
        parser.error(f"--deep-epochs must be >= 1, got {args.deep_epochs}")
    scratch, out = os.path.abspath(args.scratch), os.path.abspath(args.out)
    if args.worker_settings is None and (scratch == out or scratch.startswith(out + os.sep)):
        parser.error(f"--scratch {args.scratch} is inside --out {args.out}: checkpoints must stay out of the repository")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_settings:
        return worker_main(args)
    plan = build_plan(args.deep_epochs)
    check_plan_names(plan)
    groups = args.plan or [g for g in plan if g != "smoke"]
    runs_dir, scratch = os.path.join(args.out, "runs"), os.path.abspath(args.scratch)
    if args.list:
        print("\n".join(plan_table(plan, groups, runs_dir, scratch, args.exclude)))
        return 0
    todo = [s for s in unique_runs(plan, groups, args.exclude) if not is_stored(runs_dir, run_name(s))]
    command = shlex.join(["python", "scripts/run_experiments.py"] + (sys.argv[1:] if argv is None else list(argv)))
    if args.dry_run:
        for s in todo:
            print(f"would train {run_name(s)} ({state(runs_dir, scratch, s)}) in {os.path.join(scratch, run_name(s))}")
        print(f"{len(todo)} runs; stored in {runs_dir}; {args.jobs} job(s), one thread each")
        return 0
    os.makedirs(runs_dir, exist_ok=True)
    for leftover in (n for n in os.listdir(runs_dir) if n.startswith(".tmp-")):
        shutil.rmtree(os.path.join(runs_dir, leftover), ignore_errors=True)  # a store cut short
    def readme_writer():
        write_readme(args.out, plan, runs_dir, scratch)

    readme_writer()
    say(f"{len(todo)} runs to train ({', '.join(groups)}), {args.jobs} job(s); runs stored in {runs_dir}, "
        f"checkpoints in {scratch}")
    failed = run_all(todo, runs_dir, scratch, args.jobs, command, readme_writer)
    readme_writer()
    if failed < 0:
        return 130
    say(f"finished: {len(todo) - failed} stored, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as exc:  # one line, no traceback (Settings and run-folder errors included)
        print(f"run_experiments: {exc}", file=sys.stderr)
        sys.exit(2)
