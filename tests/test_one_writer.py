"""No job outlives its study unseen, and a folder has one writer at a time (issue 49): a closed terminal (SIGHUP)
stops a study like Ctrl-C unless nohup ignored it, a killed study (SIGKILL) takes its jobs with it, and a second
pretraining, evaluation or job on a folder that another process is writing stops at once in one sentence, the first
writer's files intact. The end-to-end studies are in the slow suite."""
import csv
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import evaluation
import knn_eval
import linear_eval
from engine import pool
from test_run_all import sleeping_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a pretraining of 64 synthetic images, 32 steps
PRETRAIN = [sys.executable, "pretrain.py", "--arch", "mobilenetv3_small", "--data", "synthetic", "--subset", "64",
            "--img-size", "32", "--batch-size", "16", "--moco-k", "32", "--moco-m", "0.9", "--epochs", "8",
            "--workers", "0", "--log-every", "4", "--knn-every", "0", "--device", "cpu", "--resume"]
REFUSED = (r"(?P<what>.+) is being written by process (?P<pid>\d+) on (?P<host>\S+) \((?P<command>.+)\) since "
           r"(?P<since>\S+): wait for it to end, or stop it \(on (?P=host): kill (?P=pid)\); then run this again\. "
           r"Nothing was written\.")


def holder(folder):
    """The lock record of the process holding `folder` once it has written it (None before)."""
    try:
        return json.load(open(os.path.join(folder, evaluation.LOCK)))
    except (OSError, ValueError):
        return None


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def hold(folder, name=evaluation.LOCK):
    """Another process that holds `folder` (as one_writer does for a script) until it is killed."""
    code = (f"import time, evaluation\nwith evaluation.one_writer({str(folder)!r}, name={name!r}):\n"
            f"    print('held', flush=True)\n    time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----- one writer per folder ------------------------------------------------------------------------------------------

def test_a_second_pretraining_on_one_out_stops_at_once_and_the_first_finishes(tmp_path):
    """Two pretrain.py --resume on one --out, started together (a rerun beside an orphan, a job started twice):
    whichever takes the folder first trains to the end; the other stops when it reaches the folder, before it
    writes, in one sentence naming the first; the run's log then has every step once."""
    out = str(tmp_path / "run")
    procs = [subprocess.Popen(PRETRAIN + ["--out", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outputs
    first, second = (0, 1) if codes[0] == 0 else (1, 0)
    said = outputs[second][1].strip().splitlines()
    assert len(said) == 1 and outputs[second][0] == "", outputs[second]
    refused = re.fullmatch(REFUSED, said[0])
    assert refused and refused["what"] == f"--out {out}" and int(refused["pid"]) == procs[first].pid, said
    assert refused["host"] == platform.node() and "pretrain.py" in refused["command"]
    steps = [r["step"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 32  # one writer: every step once, in order
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["complete"] and summary["steps"] == 32 and summary["resumed_at_step"] == 0


@pytest.mark.parametrize("script", ["knn", "linear"])
def test_an_evaluation_stops_while_another_process_writes_its_folder_and_goes_on_once_that_has_died(tmp_path, script):
    folder = tmp_path / "results"
    folder.mkdir()
    earlier = folder / f"{script}.json"
    earlier.write_text('{"earlier": true}')
    argv = ["--arch", "mobilenetv3_small", "--random-init", "--data", "synthetic", "--subset", "64",
            "--test-subset", "32", "--img-size", "32", "--device", "cpu", "--json", str(earlier)]
    argv += ["--k", "5"] if script == "knn" else ["--cached", "--epochs", "1"]
    main = {"knn": knn_eval.main, "linear": linear_eval.main}[script]
    other = hold(folder)
    try:
        with pytest.raises(SystemExit) as refused:
            main(argv)
        said = re.fullmatch(REFUSED, str(refused.value))
        assert said and said["what"] == f"{folder} (the folder of --json)" and int(said["pid"]) == other.pid
        assert earlier.read_text() == '{"earlier": true}' and sorted(os.listdir(folder)) == [".lock", earlier.name]
    finally:
        other.kill()
        other.wait()
    results = main(argv)  # its lock died with it: no obstacle
    assert json.load(open(earlier))["machine"] == results["machine"]


def test_a_refused_start_leaves_no_folder_behind_and_a_held_folder_may_be_held_again_by_its_holder(tmp_path):
    folder = str(tmp_path / "new")
    with evaluation.one_writer(folder):
        with evaluation.one_writer(folder):  # the same process, nested: no conflict
            assert holder(folder)["pid"] == os.getpid()
        assert holder(folder)["pid"] == os.getpid()
    assert not os.path.exists(folder)  # made for the lock alone, and nothing was written: gone again
    with evaluation.one_writer(folder):
        open(os.path.join(folder, "result.json"), "w").write("{}")
    assert sorted(os.listdir(folder)) == [".lock", "result.json"]


# ----- a study's jobs never outlive it unseen -------------------------------------------------------------------------

def signal_later(sig, seconds):
    threading.Timer(seconds, os.kill, (os.getpid(), sig)).start()


def test_a_closed_terminal_stops_the_study_like_ctrl_c(tmp_path, monkeypatch):
    st, job = sleeping_job(tmp_path, monkeypatch)
    signal_later(signal.SIGHUP, 3)
    start = time.time()
    assert pool.Pool(st, [job], {}, dict(os.environ)).run() == "interrupted" and time.time() - start < 30
    assert "KeyboardInterrupt" in (tmp_path / "res" / "output.log").read_text()  # the job got Ctrl-C
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # and the study's handler is gone again


def test_a_study_started_under_nohup_runs_on_when_its_terminal_closes(tmp_path, monkeypatch):
    st, job = sleeping_job(tmp_path, monkeypatch)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        signal_later(signal.SIGHUP, 2)
        result = pool.Pool(st, [job], {}, dict(os.environ), deadline=time.time() + 6).run()
        assert result == "time box"  # not interrupted: the closed terminal changed nothing
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_job_dies_with_a_study_that_is_killed(tmp_path):
    """SIGKILL leaves a study no moment to stop its jobs: the kernel sends each SIGTERM when the study is gone."""
    code = ("import subprocess, sys, time, os\nfrom engine import pool\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True,\n"
            "                     preexec_fn=pool.die_with_parent(os.getpid()))\n"
            "print(p.pid, flush=True)\ntime.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    job = int(parent.stdout.readline())
    assert alive(job)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(job), seconds=10)


def alive(pid):
    """The process is there and not a zombie waiting for its parent (a reaped orphan counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_same_job_twice_stops_the_second_before_it_writes(tmp_path, monkeypatch):
    """A plan's line started twice: the job's results folder is held by the first, so the second writes no
    command.txt or output.log and says who holds it."""
    st, job = sleeping_job(tmp_path, monkeypatch)
    (tmp_path / "res").mkdir()
    other = hold(tmp_path / "res", pool.STUDY_LOCK)
    try:
        with pytest.raises(SystemExit) as refused:
            pool.Pool(st, [job], {}, dict(os.environ)).run()
        said = re.fullmatch(REFUSED, str(refused.value))
        assert said and int(said["pid"]) == other.pid and os.listdir(tmp_path / "res") == [pool.STUDY_LOCK]
    finally:
        other.kill()
        other.wait()


# ----- end to end, on the smoke preset (slow) -------------------------------------------------------------------------

def study_env(tmp_path, **env):
    return {**os.environ, "ARCHS": "mobilenetv3_small", "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable,
            "CUDA_VISIBLE_DEVICES": "", "COST": "0", "JOBS": "2", **env}


def jobs_of(tmp_path, scripts=("pretrain.py", "knn_eval.py", "linear_eval.py")):
    """The pids of the processes of `scripts` whose command line names this study's folder: its stages running."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read()
            if str(tmp_path) in cmdline and any(s in cmdline for s in scripts) and alive(int(pid)):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def table(tmp_path):
    keys = ("arch", "recipe", "seed", "knn", "knn_random", "knn_random_bn", "knn_pixels", "linear_top1")
    return [[row[k] for k in keys] for row in csv.DictReader(open(tmp_path / "results" / "smoke" / "results.csv"))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(["bash", "run_all.sh", "smoke"], cwd=ROOT, env=study_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return table(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, and SIGKILL's prctl, are Linux's")
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_a_study_stopped_by_a_closed_terminal_or_killed_leaves_no_job_and_its_rerun_gives_the_same_table(
        tmp_path, uninterrupted, sig):
    study = subprocess.Popen(["bash", "run_all.sh", "smoke"], cwd=ROOT, env=study_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: jobs_of(tmp_path, ("pretrain.py",)), seconds=300)  # the first pretraining is running
    study.send_signal(sig)  # run_all.sh has become study.py (exec)
    out, err = study.communicate(timeout=120)
    if sig == signal.SIGHUP:
        assert study.returncode == 130 and "study: interrupted;" in out, err[-2000:]
    else:
        assert study.returncode == -signal.SIGKILL
    wait_for(lambda: not jobs_of(tmp_path, ("pretrain.py", "knn_eval.py", "linear_eval.py", "study.py")),
             seconds=10)  # nothing trains on unseen
    slices = json.load(open(tmp_path / "results" / "smoke" / "study.json"))["slices"]
    assert [s["closed"] for s in slices] == [sig == signal.SIGHUP]  # a killed slice is on record, left open
    rerun = subprocess.run(["bash", "run_all.sh", "smoke"], cwd=ROOT, env=study_env(tmp_path), capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert table(tmp_path) == uninterrupted
    said = (tmp_path / "results" / "smoke" / "RESULTS.md").read_text()
    assert ("its record was not closed" in said) == (sig == signal.SIGKILL), said[-1500:]


@pytest.mark.slow
def test_two_identical_lines_of_a_plan_side_by_side_run_the_job_once(tmp_path):
    plan = subprocess.run(["bash", "run_all.sh", "smoke"], cwd=ROOT, env=study_env(tmp_path, PLAN="1"),
                          capture_output=True, text=True, timeout=300)
    line = next(x for x in plan.stdout.splitlines() if "--job run:" in x)
    first = subprocess.Popen(["sh", "-c", line], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "results" / "smoke" / "mobilenetv3_small_baseline_s0"
    wait_for(lambda: os.path.exists(folder / pool.STUDY_LOCK) and (folder / "command.txt").exists())
    second = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=300)
    commands = (folder / "command.txt").read_text()
    assert second.returncode == 1 and re.search(REFUSED, second.stderr), second.stderr[-2000:]
    assert first.wait(timeout=600) == 0, first.communicate()[1][-2000:]
    for recipe in ("baseline", "small"):
        run = tmp_path / "results" / "smoke" / f"mobilenetv3_small_{recipe}_s0"
        steps = [json.loads(x)["step"] for x in open(run / "log.jsonl") if '"loss"' in x]
        assert steps == sorted(set(steps))  # one writer: no step twice
        assert (run / "command.txt").read_text().count("pretrain.py") == 1
    assert (folder / "command.txt").read_text().startswith(commands)
