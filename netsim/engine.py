"""Local training at event boundaries, batched: jobs whose cost is known now and whose values
are computed when first needed.

A protocol submits a device's local job at the simulated moment the device starts it, on the
state it holds then (the model version it downloaded)::

    pending = engine.submit(LocalJob(device, round, steps, batch_size), base=version)
    yield env.timeout(compute_time_s(pending.cost.flops, device_flops_per_s))
    ...
    result = pending.result        # values: computed now if they are not yet

:meth:`Engine.submit` asks the trainer to *plan* the job: its batches are drawn from the
device's own generator and its cost (FLOPs, peak memory, payload bytes) follows from their
shapes, which the trainer has profiled. The timeline advances on that cost alone. The values
(losses, the update) are computed the first time any pending job's result is read: then every
job pending at that moment is executed together (:meth:`Trainer.execute`, which batches jobs
of one shape into one forward/backward per step). A synchronous round therefore still trains
its K devices as one pass, and an asynchronous run batches the jobs that overlap in simulated
time.

Why this is exact: a job's values depend only on its base state, its batches and its seed, all
fixed at submission, so computing them later, or together with others, changes nothing (the
trainer's batched pass equals one-job-at-a-time training; see :mod:`fomo.batched`). Pending
jobs run in (round, device, submission) order, so the composition of the batched passes, and
with it every float, is a function of the scenario and seed alone.

Values that belong in the event log but are known only after execution (a job's mean loss on
its ``compute`` event) are filled in by :meth:`PendingJob.when_done` callbacks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .interfaces import JobCost, LocalJob, LocalResult, PlannedJob, Trainer

ResultCallback = Callable[[LocalResult], None]


class PendingJob:
    """A submitted local job: ``cost`` now, ``result`` when first read."""

    __slots__ = ("plan", "_engine", "_seq", "_result", "_callbacks", "cancelled")

    def __init__(self, engine: "Engine", plan: PlannedJob, seq: int):
        self.plan = plan
        self._engine = engine
        self._seq = seq
        self._result: Optional[LocalResult] = None
        self._callbacks: list[ResultCallback] = []
        self.cancelled = False

    @property
    def job(self) -> LocalJob:
        return self.plan.job

    @property
    def cost(self) -> JobCost:
        return self.plan.cost

    @property
    def base(self) -> Any:
        """The global-state snapshot the job trains from."""
        return self.plan.base

    @property
    def done(self) -> bool:
        """Whether the values have been computed."""
        return self._result is not None

    @property
    def result(self) -> LocalResult:
        """The job's result; executes every pending job first if this one has not run."""
        if self.cancelled:
            raise RuntimeError(f"job of device {self.job.device_id} (round {self.job.round}) was cancelled")
        if self._result is None:
            self._engine.run_pending()
        assert self._result is not None
        return self._result

    def when_done(self, callback: ResultCallback) -> None:
        """Call ``callback(result)`` once the values exist (now, if they already do)."""
        if self._result is not None:
            callback(self._result)
        else:
            self._callbacks.append(callback)

    def cancel(self) -> None:
        """Drop a job whose values will never be needed (its device left); it is not run."""
        if self._result is None and not self.cancelled:
            self.cancelled = True
            self._engine._drop(self)

    def _deliver(self, result: LocalResult) -> None:
        self._result = result
        for callback in self._callbacks:
            callback(result)
        self._callbacks.clear()


class Engine:
    """Plans local jobs at submission and executes the pending ones together when a value is
    first needed.

    Attributes
    ----------
    passes : int
        How many times pending jobs were executed (each time, all of them in one call to the
        trainer, which runs jobs of one shape as one batched pass).
    jobs_run : int
        Jobs executed in all.
    jobs_cancelled : int
        Jobs dropped before they ran (their values were never needed).
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._pending: list[PendingJob] = []
        self._seq = 0
        self.passes = 0
        self.jobs_run = 0
        self.jobs_cancelled = 0
        self.largest_pass = 0

    def snapshot(self) -> Any:
        """The trainer's current global state, as a base for jobs submitted later."""
        return self.trainer.snapshot()

    def submit(self, job: LocalJob, base: Any = None) -> PendingJob:
        """Plan ``job`` from ``base`` (default: the global state now) and return it pending."""
        if base is None:
            base = self.trainer.snapshot()
        pending = PendingJob(self, self.trainer.plan(job, base), self._seq)
        self._seq += 1
        self._pending.append(pending)
        return pending

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def run_pending(self) -> int:
        """Execute every pending job in one call to the trainer; returns how many ran."""
        if not self._pending:
            return 0
        batch = sorted(self._pending, key=lambda p: (p.job.round, p.job.device_id, p._seq))
        self._pending = []
        results = self.trainer.execute([p.plan for p in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"trainer returned {len(results)} results for {len(batch)} jobs")
        for pending, result in zip(batch, results):
            pending._deliver(result)
        self.passes += 1
        self.jobs_run += len(batch)
        self.largest_pass = max(self.largest_pass, len(batch))
        return len(batch)

    def stats(self) -> dict:
        """``{passes, jobs_run, jobs_cancelled, mean_jobs_per_pass, largest_pass}``."""
        return {
            "passes": self.passes,
            "jobs_run": self.jobs_run,
            "jobs_cancelled": self.jobs_cancelled,
            "mean_jobs_per_pass": self.jobs_run / self.passes if self.passes else 0.0,
            "largest_pass": self.largest_pass,
        }

    def _drop(self, pending: PendingJob) -> None:
        self._pending.remove(pending)
        self.jobs_cancelled += 1
