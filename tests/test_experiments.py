"""scripts/run_experiments.py and scripts/experiment_summary.py on the tiny "smoke" plan (ResNet-8,
64 images, 2 epochs): runs are stored, a second call skips them, a stopped run resumes where it
stopped, and the summary reads what was stored."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)

import experiment_summary  # noqa: E402
import run_experiments  # noqa: E402

from minisd import experiments, residual  # noqa: E402
from minisd.training import Settings, TrainingInterrupted, fit  # noqa: E402


def metrics_without_time(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in handle if line.strip()]


def test_plan_names_learning_rates_and_sharing():
    plan = run_experiments.build_plan()
    run_experiments.check_plan_names(plan)
    # One name per setting, and a name that says what the run is.
    everything = {run_experiments.run_name(s): s for runs in plan.values() for s in runs}
    assert len(everything) == len({tuple(sorted(s.to_dict().items())) for s in everything.values()})
    assert "digits-resnet110-linear-p0.5-trainall-e30-seed2" in everything
    # The learning rate follows the depth, and a run that departs from the rule says so in its name.
    for name, s in everything.items():
        assert (s.lr == (0.025 if s.depth >= 56 else Settings().lr)) == ("-lr" not in name), name
    assert "digits-resnet1202-linear-p0.5-trainall-e30-lr0.0025-seed1" in everything
    assert "digits-resnet1202-none-p1-trainall-e30-warmup1-seed0" in everything
    # Matched expected depth: uniform p runs as many blocks as linear decay to 0.5 (40.25 of 54).
    p = run_experiments.matched_uniform_p()
    assert 54 * p == pytest.approx(sum(residual.linear_decay(54, 0.5)))
    # The sweep's p_L = 0.5 uniform runs are the uniform group's; --exclude leaves out the wall-clock group's runs.
    both = run_experiments.unique_runs(plan, ["sweep", "uniform"])
    assert len(both) == len(plan["sweep"]) + len(plan["uniform"]) - len(run_experiments.SEEDS)
    left = {run_experiments.run_name(s) for s in run_experiments.unique_runs(plan, ["sweep", "uniform"], ["wallclock"])}
    wallclock = {run_experiments.run_name(s) for s in plan["wallclock"]}
    assert not left & wallclock and len(left) == len(both) - len({run_experiments.run_name(s) for s in both} & wallclock)
    smalldata = plan["smalldata"]
    assert {s.train_subset for s in smalldata} == {1257 // 4} and len({s.seed for s in smalldata}) >= 5


def test_mean_sd_and_its_text():
    assert experiments.mean_sd([2.0, 4.0]) == (3.0, pytest.approx(2 ** 0.5))
    assert experiments.format_mean_sd([2.0, 4.0]) == "3.00 ± 1.41"
    assert experiments.format_mean_sd([2.0]) == "2.00 (1 seed)" and experiments.format_mean_sd([]) == "pending"


def test_a_stored_run_missing_a_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"run[/\\]metrics.jsonl: cannot read it"):
        experiments.read_run(tmp_path / "run")


def test_sign_flip_test_is_exact():
    test = experiments.sign_flip_test([1.0, 2.0, 3.0])
    assert (test["p_one_sided"], test["p_two_sided"], test["smallest_p"]) == (1 / 8, 2 / 8, 1 / 8)
    # A zero difference has no sign to flip: both of its patterns count.
    assert experiments.sign_flip_test([0.0, 1.0])["p_one_sided"] == 2 / 4
    assert experiments.sign_flip_test([-1.0, -2.0])["p_one_sided"] == 1.0
    with pytest.raises(ValueError, match="no differences"):
        experiments.sign_flip_test([])


def test_bad_options_say_so_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        run_experiments.main(["--jobs", "0"])
    assert stop.value.code == 2 and "--jobs must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_runner_stores_skips_resumes_and_summarises(tmp_path, capsys):
    out, scratch = tmp_path / "experiments", tmp_path / "scratch"
    common = ["--plan", "smoke", "--out", str(out), "--scratch", str(scratch)]
    runs_dir = out / "runs"
    smoke = run_experiments.build_plan()["smoke"]
    names = [run_experiments.run_name(s) for s in smoke]

    assert run_experiments.main(common + ["--dry-run"]) == 0
    assert not runs_dir.exists() and capsys.readouterr().out.count("would train") == len(smoke)

    # A run stopped by Ctrl-C after its first epoch (the trainer's own path: a checkpoint is saved).
    stopped = smoke[1]
    stopped_dir = scratch / run_experiments.run_name(stopped)

    def ctrl_c_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(stopped, run_dir=stopped_dir, log=ctrl_c_after_first_epoch, progress=False)
    assert len(metrics_without_time(stopped_dir)) == 1
    assert run_experiments.main(common + ["--list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"partial \(1/2 epochs\) +{run_experiments.run_name(stopped)}", listed)
    assert listed.count("pending") == len(smoke) - 1

    assert run_experiments.main(common + ["--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done ") == len(smoke) and "FAILED" not in printed
    for name in names:
        assert sorted(os.listdir(runs_dir / name)) == ["metrics.jsonl", "runner.json", "settings.json", "summary.json"]
        assert not any(n.endswith(".npz") for n in os.listdir(runs_dir / name))
    with open(scratch / (stopped_dir.name + ".runner") / "worker.log", encoding="utf-8") as handle:
        assert "resuming" in handle.read()
    runner = json.loads((runs_dir / names[1] / "runner.json").read_text())
    assert runner["sessions"][-1]["threads"]["OPENBLAS_NUM_THREADS"] == "1" and runner["sessions"][-1]["resumed"]
    # The resumed run is the run that was never stopped: train it again in one go and compare.
    fit(stopped, run_dir=tmp_path / "uninterrupted", log=lambda line: None, progress=False)
    assert metrics_without_time(runs_dir / names[1]) == metrics_without_time(tmp_path / "uninterrupted")

    # Called again: every run is stored, nothing is trained, nothing is touched.
    stamps = {n: os.path.getmtime(runs_dir / n / "summary.json") for n in names}
    assert run_experiments.main(common) == 0
    assert "0 runs to train" in capsys.readouterr().out
    assert run_experiments.main(common + ["--list"]) == 0
    assert f"{len(names)} runs, {len(names)} stored" in capsys.readouterr().out
    assert stamps == {n: os.path.getmtime(runs_dir / n / "summary.json") for n in names}
    readme = (out / "README.md").read_text()
    assert "## Hypotheses" in readme and "--plan smoke" in readme and "stored" in readme

    # The summary reads what was stored.
    runs = experiments.load_runs(runs_dir)
    assert sorted(runs) == sorted(names)
    linear = experiments.select(runs, depth=8, schedule="linear", final_survival=0.5)
    assert [r.seed for r in linear] == [0, 1] and all(r.settings["schedule"] == "linear" for r in linear)
    assert experiments.select(runs, depth=8, warmup_epochs=0) == experiments.select(runs, depth=8)  # the default
    assert experiments.select(runs, depth=8, warmup_epochs=1) == []
    assert experiments.select(runs, seeds=(1,), depth=8, schedule="none") == [runs[n] for n in names if "none" in n and n.endswith("seed1")]
    run = runs[names[1]]
    assert run.best_error == pytest.approx(100 * (1 - run.summary["test_acc"]))
    assert run.last_error == pytest.approx(100 * (1 - run.metrics[-1]["test_acc"]))
    assert run.step_time == pytest.approx(sum(r["time_s"] for r in run.metrics))
    assert 0 < run.active_fraction < 1 and statistics.fmean([run.wall_time]) > 0
    assert experiment_summary.main(["--runs", str(runs_dir)]) == 0
    assert f"{len(names)} stored runs" in capsys.readouterr().out


@pytest.mark.slow
def test_a_scratch_folder_holding_another_run_fails_that_run_only(tmp_path, capsys):
    out, scratch = tmp_path / "experiments", tmp_path / "scratch"
    smoke = run_experiments.build_plan()["smoke"]
    name = run_experiments.run_name(smoke[0])
    (scratch / name).mkdir(parents=True)
    other = dict(smoke[0].to_dict(), lr=0.5)
    (scratch / name / "settings.json").write_text(json.dumps(other))
    failed = run_experiments.run_all(smoke[:1], str(out / "runs"), str(scratch), 1, "test", lambda: None)
    assert failed == 1 and "FAILED" in capsys.readouterr().out
    assert not (out / "runs" / name).exists()
    with open(scratch / (name + ".runner") / "worker.log", encoding="utf-8") as handle:
        assert "lr is 0.5 there, the plan says 0.1" in handle.read()


def test_files_an_earlier_runner_left_in_a_run_folder_move_beside_it(tmp_path):
    """Earlier runners wrote their log and planned settings into minisd's run folder, which minisd
    now refuses to resume (files it did not write): the runner moves them out first."""
    run = tmp_path / "digits-resnet8-none-p1-train64-e2-seed0"
    run.mkdir()
    (run / "worker.log").write_text("old log\n")
    (run / "runner-sessions.jsonl").write_text("{}\n")
    (run / "metrics.jsonl").write_text("")
    folder = run_experiments.runner_folder(str(run))
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]
    assert (tmp_path / (run.name + ".runner") / "worker.log").read_text() == "old log\n"
    assert os.path.isfile(os.path.join(folder, "sessions.jsonl"))
