"""The model worker: one thread owns the pipeline and runs jobs one at a time, in arrival order.

Requests never touch the model themselves: each queues a job and waits on its future. So any number arriving at
once are each answered with their own result, a generation never races a model switch, and the device holds one
request's batch at a time. Waiting jobs know their place in the queue; the running one reports its step.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field


class Interrupted(Exception):
    """POST /interrupt stopped the running job; it answers with the images it had finished."""


@dataclass
class Progress:
    """The running job, as /progress reports it (A1111's state fields)."""

    job: str = ""  # empty when idle
    job_no: int = 0  # the batch being made (A1111 counts n_iter batches as jobs)
    job_count: int = 0
    step: int = 0  # steps done in this batch
    steps: int = 0
    started: float = 0.0
    latents: object = None  # (C, h, w) of the batch's first image after the last step, for a preview
    interrupted: bool = False


@dataclass(eq=False)
class Job:
    name: str
    run: object  # callable(worker) -> result, run on the worker thread
    future: Future = field(default_factory=Future)


class Worker:
    def __init__(self, pipe, model_title: str):
        self.pipe, self.model_title = pipe, model_title  # replaced only on the worker thread (a model switch job)
        self.progress = Progress()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="latentdiff-worker", daemon=True)
        self._thread.start()

    def submit(self, name: str, run) -> Job:
        job = Job(name, run)
        with self._lock:
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def place(self, job: Job) -> int:
        """How many jobs run before this one (0: it is running or done)."""
        with self._lock:
            return self._waiting.index(job) + (self.progress.job != "") if job in self._waiting else 0

    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def begin_batch(self, job_no: int, job_count: int, steps: int) -> None:
        self.progress.job_no, self.progress.job_count = job_no, job_count
        self.progress.step, self.progress.steps, self.progress.latents = 0, steps, None

    def on_step(self, i: int, t: int, latents) -> None:
        """The pipeline's per-step callback: count the step, keep a preview, stop here when interrupted."""
        self.progress.step += 1
        self.progress.latents = latents[0].detach().clone()
        if self.progress.interrupted:
            raise Interrupted()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._waiting.remove(job)
                self.progress = Progress(job=job.name, started=time.time())
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.run(self))
            except BaseException as e:  # the request that sent it gets the error; the worker serves the next
                job.future.set_exception(e)
            finally:
                self.progress = Progress()
