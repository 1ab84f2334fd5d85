"""One generation at a time: a worker thread owns the Pipeline; a bounded queue feeds it; progress as A1111 reports it.

Pipeline is not thread safe, so only the worker thread ever calls it. A full queue raises QueueFull (HTTP 429
with Retry-After). A client that goes away does not stop the worker: its job finishes (or, if still waiting and
its request was cancelled, is skipped) and the next one starts.
"""

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

from sdrt.errors import Interrupted, SkipImage

DURATION_SMOOTHING = 0.3  # weight of the newest job in the running mean of job durations (for Retry-After)


class QueueFull(Exception):
    """Every queue slot is taken; retry_after is the server's estimate in whole seconds (HTTP 429)."""

    def __init__(self, retry_after: int, size: int):
        self.retry_after = retry_after
        super().__init__(f"the queue is full ({size} jobs waiting); retry in about {retry_after} s")


class Unavailable(Exception):
    """The job was lost with the process that ran it (a Ray replica died); a retry is served (HTTP 503)."""

    def __init__(self, retry_after: int, reason: str):
        self.retry_after = retry_after
        super().__init__(f"{reason}; retry in about {retry_after} s")


@dataclass
class Job:
    """A unit of work: run(step_callback) calls the Pipeline and returns what the request needs."""

    kind: str  # A1111's job name: "txt2img", "img2img", "outpaint"
    run: Callable
    batches: int  # A1111's job_count: n_iter
    future: Future = field(default_factory=Future)
    preview: Callable | None = None  # preview(denoised) -> base64 PNG of the first image, run on the worker
    preview_every: int = 0  # at least this many steps between live previews (<= 0: none), decoded when polled
    task_id: str = ""  # A1111's id_task


class State:
    """What /sdapi/v1/progress reports: A1111's shared.state fields for the running job."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.job, self.job_count, self.job_no = "", 0, 0
        self.sampling_step, self.sampling_steps = 0, 0
        self.interrupted, self.skipped = False, False
        self.job_timestamp, self.time_start = "0", time.time()
        self.task_id = ""
        self.current_image = None  # base64 PNG of the latest preview, or None
        self.preview_wanted = False  # a /progress poll asked for current_image since the last preview
        self.preview_step = None  # the step current_image shows

    def as_dict(self) -> dict:
        """A1111's State.dict()."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def begin(self, kind: str, batches: int, task_id: str) -> None:
        """A job starts: A1111's job, job_count (n_iter) and job_timestamp."""
        self.reset()
        self.job, self.job_count, self.task_id = kind, batches, task_id
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")

    def advance(self, step: int, total: int) -> None:
        """Pipeline.generate's callback counts STEP of TOTAL over all batches: A1111's job_no and sampling_step."""
        per_batch = max(total // max(self.job_count, 1), 1)
        self.job_no = (step - 1) // per_batch
        self.sampling_step = step - self.job_no * per_batch
        self.sampling_steps = per_batch

    def progress(self) -> tuple[float, float]:
        """(progress in [0, 1], eta_relative in seconds), A1111's formula: batches done plus this one's steps."""
        if self.job_count == 0:
            return 0.0, 0.0
        done = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            done += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.time_start
        return min(done, 1.0), elapsed / done - elapsed


class Worker:
    """The thread that runs jobs one at a time, from a queue of at most max_waiting jobs."""

    def __init__(self, max_waiting: int):
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=max_waiting)
        self.max_waiting = max_waiting
        self.state = State()
        self.busy = False
        self.mean_seconds = 5.0  # running mean of job durations, seeded with a guess
        self.completed = 0
        self.thread = threading.Thread(target=self._loop, name="sdrt-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        """Queue JOB, or raise QueueFull."""
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            waiting = self.pending.qsize() + int(self.busy)
            raise QueueFull(max(1, math.ceil(self.mean_seconds * waiting)), self.max_waiting) from None
        return job.future

    def interrupt(self, task_id: str | None = None) -> None:
        """A1111's Interrupt: the running job (if TASK_ID is given: only if it is that one) stops after its current
        sampler step."""
        with self.state.lock:
            if self.state.job and task_id in (None, self.state.task_id):
                self.state.interrupted = True

    def skip(self) -> None:
        """A1111's Skip: the running job's current batch ends after its current sampler step and is decoded from
        its x0 estimate so far; the job goes on with its next batch."""
        with self.state.lock:
            if self.state.job:
                self.state.skipped = True

    def stop(self) -> None:
        self.pending.put(None)

    def _loop(self) -> None:
        while (job := self.pending.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            self._begin(job)
            start = time.monotonic()
            result, error = None, None
            try:
                result = job.run(lambda step, total, x0, job=job: self._step(job, step, total, x0))
            except BaseException as e:  # the request gets it; the worker goes on
                error = e
            seconds = time.monotonic() - start
            self.mean_seconds += DURATION_SMOOTHING * (seconds - self.mean_seconds)
            self.completed += 1
            with self.state.lock:  # idle again before the client hears back
                self.state.reset()
                self.busy = False
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def _begin(self, job: Job) -> None:
        with self.state.lock:
            self.state.begin(job.kind, job.batches, job.task_id)
            self.busy = True

    def _step(self, job: Job, step: int, total: int, denoised) -> None:
        """Pipeline.generate's callback: progress, interruption, and a live preview of this step's x0 when a poll
        asked for one and at least show_progress_every_n_steps have passed since the last (A1111's
        State.set_current_image); with nobody polling, no preview is ever decoded."""
        with self.state.lock:
            state = self.state
            state.advance(step, total)
            interrupted, skipped = state.interrupted, state.skipped
            state.skipped = False
            every = job.preview_every
            due = state.preview_step is None or step - state.preview_step >= every
            wanted = state.preview_wanted and due and every > 0 and job.preview is not None and denoised is not None
        if interrupted:
            raise Interrupted()
        if skipped:
            raise SkipImage()
        if wanted:
            image = job.preview(denoised)
            with self.state.lock:
                self.state.current_image, self.state.preview_step, self.state.preview_wanted = image, step, False
