"""The pool: a slice's jobs on JOBS slots, each job's stages as processes of their own, until the queue is empty,
the time box ends or the study is stopped; one progress line with the study's ETA.

Stopping: Ctrl-C, TERM, a closed terminal (SIGHUP, unless it was ignored when the study started, as nohup leaves
it) and the end of the time box send every running stage Ctrl-C (pretrain.py saves nothing partial and resumes),
TERM after 30 s. A study killed without that chance (SIGKILL, the OOM killer) takes its stages with it on Linux
(die_with_parent). A job holds its results folders while it runs, so the same job started twice (a plan's line run
twice, a second study) stops in one sentence before it writes.
"""
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import run_state
from engine.cost import job_cost, makespan, stage_cost
from engine.jobs import replace
from engine.presets import ROOT
from evaluation import one_writer

# the lock a study holds on results/PRESET while it runs, and a job on each results folder it writes (command.txt,
# output.log); the scripts it starts hold evaluation.LOCK on the folders they write
STUDY_LOCK = ".study.lock"


class Stopped(Exception):
    pass


class Pool:
    """JOBS slots working through `jobs` in order; the two runs of a pair start in the same slice. `predicted`:
    {job: seconds} worked out before (the rest are worked out when first asked)."""

    def __init__(self, study, jobs, speeds, env, deadline=None, out=sys.stdout, predicted=None, on_end=None):
        self.study, self.queue, self.speeds, self.env, self.deadline = study, list(jobs), speeds, env, deadline
        self.on_end = on_end or (lambda: None)  # called as each job ends (study.py: the slice's record)
        self.slots = [None] * study.jobs
        self.out, self.tty = out, out.isatty()
        self.finished, self.not_started, self.committed = [], [], set()
        self.interrupted = None
        self.estimate = Estimate(speeds, predicted, self.finished)

    def say(self, line):
        write(self.out, ("\r\033[K" if self.tty else "") + line + "\n")

    def run(self):
        """'done', 'time box' (jobs were left for the next slice) or 'interrupted'; a failing job raises
        SystemExit with the end of its log."""
        shown = 0.0
        try:
            with stop_signals(self.on_signal):
                while self.queue or any(self.slots):
                    if self.interrupted:
                        raise Stopped(self.interrupted)
                    if self.deadline and time.time() >= self.deadline and any(self.slots):
                        raise Stopped("time box")
                    for i in range(len(self.slots)):
                        if self.slots[i] is not None:
                            self.poll(i)
                        if self.slots[i] is None:
                            self.start_next(i)
                    if not any(self.slots) and self.queue:
                        continue
                    if time.time() - shown >= (1 if self.tty else 60):
                        shown = time.time()
                        self.progress()
                    time.sleep(0.5)
        except Stopped as e:
            self.stop_all()
            return "time box" if str(e) == "time box" else "interrupted"
        finally:
            if self.tty:  # the progress line makes way for what follows
                write(self.out, "\r\033[K")
        return "time box" if self.not_started else "done"

    def on_signal(self, signum, frame):
        self.interrupted = signal.Signals(signum).name

    def start_next(self, i):
        while self.queue:
            job = self.queue.pop(0)
            left = job.left()
            if not left.stages:
                if left.staged:  # finished in .staging/ by a study stopped before the move: the move, now
                    with self.hold(job, [left.staged[0]]):
                        replace(left.staged, (left.results, left.run))
                self.finished.append((job, 0.0, 0.0))
                self.say(f"== {job.name}: done" + (", moved from .staging/ into its place" if left.staged else
                                                   ", skipped"))
                continue
            cost = self.estimate.cost(job)
            partner = job.partner
            if partner in self.queue:  # the pair together, side by side, or one after the other on one slot
                pair = cost + self.estimate.cost(partner) if len(self.slots) == 1 else max(
                    cost, self.estimate.cost(partner))
            else:
                pair = cost
            late = self.deadline and time.time() + pair * self.estimate.pace() > self.deadline
            if late and job not in self.committed:
                self.not_started.append(job)  # would not finish inside the box: left for the next slice
                continue
            if partner in self.queue:
                self.committed.add(partner)  # the pair's other run starts in this slice too, on this machine
            held = self.hold(job, [st.results for st in left.stages])  # before anything is written there
            left = job.left()  # as it is now that no one else can change it
            self.slots[i] = {"job": job, "left": left, "stages": list(left.stages), "proc": None, "cost": cost,
                             "start": time.time(), "held": held}
            self.say(f"== {time.strftime('%H:%M:%S')} {job.name} -> {left.results}"
                     + (" (replacing its results when it has finished)" if left.staged else ""))
            self.launch(i)
            return

    def hold(self, job, folders):
        """The job's results folders, held (STUDY_LOCK) until the returned ExitStack is closed; a folder another
        process holds stops the study like a failing job (the running ones stopped first) with one sentence."""
        with contextlib.ExitStack() as hold:
            try:
                for folder in dict.fromkeys(folders):
                    hold.enter_context(one_writer(folder, name=STUDY_LOCK, what=f"study.py, job {job.name}"))
            except SystemExit:
                self.stop_all()
                raise
            return hold.pop_all()

    def launch(self, i):
        slot = self.slots[i]
        st = slot["stages"][0]
        os.makedirs(st.results, exist_ok=True)
        env = dict(self.env)
        if self.study.jobs > 1 and self.study.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % self.study.gpus)
        argv = self.study.launcher(st.script) + st.argv
        threads = [f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in env else []
        with open(os.path.join(st.results, "command.txt"), "a") as f:
            f.write(shlex.join(threads + argv) + "\n")
        slot["log"] = open(os.path.join(st.results, "output.log"), "a")
        # a process group of its own: stopping the stage stops its torchrun and DataLoader workers too
        slot["proc"] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=slot["log"], stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        slot["stage_start"] = time.time()
        slot["stage_cost"] = stage_cost(slot["job"], st, self.speeds) if self.speeds else 0.0  # what is left now
        # a resumed pretraining trims its log back to its checkpoint as it starts: its progress counts from the
        # log's last step at launch, which the new session reaches again first
        slot["stage_step"] = max(run_state.saved_step(st.run) or 0, last_step(st.run)) if st.run else 0

    def poll(self, i):
        slot = self.slots[i]
        rc = slot["proc"].poll()
        if rc is None:
            return
        slot["log"].close()
        st = slot["stages"].pop(0)
        if rc:
            self.stop_all()
            log = os.path.join(st.results, "output.log")
            tail = "".join(open(log).readlines()[-15:])
            raise SystemExit(f"{tail}study: the job '{slot['job'].name}' failed ({st.script} exit {rc}); the end of "
                             f"{log} is above.")
        if st.script == "pretrain.py":  # the run's logs beside its results
            for name in ("log.jsonl", "summary.json"):
                shutil.copy(os.path.join(st.run, name), os.path.join(st.results, name))
        left = slot["left"]
        if left.staged and not slot["stages"]:
            replace(left.staged, (left.results, left.run))  # the new run takes the old one's place now
        if slot["stages"]:
            self.launch(i)
            return
        took = time.time() - slot["start"]
        self.finished.append((slot["job"], slot["cost"], took))
        slot["held"].close()
        self.slots[i] = None
        self.on_end()
        predicted = f" (predicted {run_state.duration(slot['cost'])})" if self.speeds else ""
        self.say(f"== {time.strftime('%H:%M:%S')} {slot['job'].name}: done in {run_state.duration(took)}{predicted}; "
                 f"{self.status()}")

    def status(self):
        jobs = [j for j, _, _ in self.finished]
        running = [s["job"] for s in self.slots if s]
        everything = jobs + running + self.queue + self.not_started
        runs_done, refs_done = sum(j.is_run for j in jobs), sum(not j.is_run for j in jobs)
        runs, refs = sum(j.is_run for j in everything), sum(not j.is_run for j in everything)
        eta = self.estimate.eta(self.queue, self.slots) if self.speeds else None
        return (f"{runs_done} of {runs} runs and {refs_done} of {refs} references done"
                + (f"; study ETA {run_state.duration(eta)}" if eta is not None else ""))

    def progress(self):
        line = f"-- {time.strftime('%H:%M:%S')} {self.status()}"
        if self.tty:
            write(self.out, "\r\033[K" + line[:max(40, shutil.get_terminal_size().columns - 1)])
            return
        for s in self.slots:
            if s:
                line += f" | {s['job'].name}: {last_line(os.path.join(s['stages'][0].results, 'output.log'))[:60]}"
        self.say(line)

    def stop_all(self, grace=30):
        stop([s["proc"] for s in self.slots if s and s.get("proc")], grace)
        for s in self.slots:
            if s and s.get("log"):
                s["log"].close()
            if s:
                s["held"].close()
        self.slots = [None] * len(self.slots)


class Estimate:
    """The jobs' predicted seconds (`predicted`: those worked out before; the rest when first asked), corrected by
    how the jobs `finished` so far compared with theirs, and the study's ETA from them."""

    def __init__(self, speeds, predicted, finished):
        self.speeds, self.predicted, self.finished = speeds, dict(predicted or {}), finished

    def cost(self, job):
        """A queued job's predicted seconds, worked out once: nothing changes what is left of it while it waits
        (the progress line asks for every queued job's each second)."""
        if job not in self.predicted:
            self.predicted[job] = job_cost(job, self.speeds)
        return self.predicted[job]

    def pace(self):
        """Actual over predicted seconds of the jobs finished so far (1 before any): the ETA's correction."""
        actual = sum(took for _, cost, took in self.finished if cost)
        predicted = sum(cost for _, cost, took in self.finished if cost)
        return actual / predicted if predicted and actual else 1.0

    def remaining(self, slot):
        """Predicted seconds left of a running job: a pretraining from the pace of its own steps so far (its log),
        once it has logged some; any other stage from its prediction, less its time so far; then its stages left."""
        pace, job = self.pace(), slot["job"]
        current, *later = slot["stages"]
        so_far = time.time() - slot["stage_start"]
        now = max(0.0, slot["stage_cost"] * pace - so_far)
        if current.script == "pretrain.py":
            step, total = last_step(current.run), self.speeds[job.arch][job.label]["steps"]
            if step and step > slot["stage_step"]:
                now = so_far * (total - step) / (step - slot["stage_step"])
        return now + sum(stage_cost(job, st, self.speeds) for st in later) * pace

    def eta(self, queue, slots):
        """Seconds until the slots have worked through the queue, each running job's remaining() first."""
        return makespan([self.cost(j) * self.pace() for j in queue], len(slots),
                        [self.remaining(s) for s in slots if s])


# ----- the stages' processes ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stop_signals(handler):
    """`handler` for Ctrl-C, TERM and a closed terminal inside the block (SIGHUP only where it was not ignored when
    the block began: nohup's study runs on); the handlers before it afterwards."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop(procs, grace=30):
    """Ctrl-C to each process's group; TERM after `grace` seconds to any still running (where Ctrl-C is ignored: a
    study started in the background by a non-interactive shell)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
    deadline = time.time() + grace
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        p.wait()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(study_pid):
    """A stage's preexec_fn: on Linux the kernel sends its process SIGTERM when the study that started it dies,
    SIGKILL and the OOM killer included (prctl PR_SET_PDEATHSIG), so that nothing trains on unseen; None elsewhere
    (macOS has no such call: there a stage outlives a killed study, and the folder it writes stays locked while it
    runs, evaluation.one_writer)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    # preexec_fn runs between fork and exec; Python warns that it is unsafe where threads hold locks. The study's
    # process has torch imported but runs no threads of its own, and this function calls into libc alone.
    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != study_pid:  # the study died before the call: nothing would tell this process
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def write(out, text):
    """Print to the study's terminal; one that has gone (SIGHUP: writes fail) is no reason to stop cleaning up."""
    try:
        out.write(text)
        out.flush()
    except OSError:
        pass


def last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4000))
            lines = [x for x in f.read().decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def last_step(run):
    """The last step a running pretraining logged (its log.jsonl), 0 before any."""
    try:
        with open(os.path.join(run, "log.jsonl"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 2000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return json.loads(line).get("step") or 0
    return 0
