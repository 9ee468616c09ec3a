"""The edge as a shared compute server that queues and batches requests (SimPy).

In split fine-tuning every local step of every device needs the edge: the device uploads its
cut activations and waits for the edge's forward and backward. The edge serves these requests
from one first-come-first-served queue with greedy batching:

* when the edge is idle and requests wait, it takes the first ``min(waiting, max_batch)`` of
  them and serves them together (requests arriving at the same instant join the same pass);
  requests that arrive meanwhile wait for the next pass;
* a pass over requests of f_1 .. f_b FLOPs lasts

  .. math::
      S = s_0 + \\frac{\\sum_i f_i}{F_{edge}}

  where ``s_0`` (``overhead_s``) is the fixed cost of a pass (kernel launches, scheduling,
  reading the weights once) and F_edge the edge's throughput [FLOP/s]. Batching amortises
  s_0 over the batch; it never changes the FLOPs.

Each request's waiting time W (arrival to start of its pass) and sojourn W + S are recorded.
With ``max_batch = 1`` and ``overhead_s = 0`` this is a single-server FCFS queue with service
time f / F_edge, so with Poisson arrivals and equal requests it is M/D/1, whose mean wait is
Pollaczek-Khinchine's rho / (2 mu (1 - rho)) (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import simpy


@dataclass(frozen=True)
class Service:
    """What a request got: its wait and the pass that served it."""

    wait_s: float        # arrival to the start of its pass [s]
    start_s: float       # start of its pass [s]
    duration_s: float    # duration of its pass [s]
    batch_size: int      # requests served in that pass


@dataclass
class EdgeStats:
    """Totals of an :class:`EdgeBatchServer`."""

    requests: int = 0
    passes: int = 0
    busy_s: float = 0.0
    flops: float = 0.0
    waits_s: list[float] = field(default_factory=list)

    def summary(self, horizon_s: float) -> dict:
        """``{requests, passes, mean_batch_size, utilisation, mean_queue_delay_s,
        p95_queue_delay_s, max_queue_delay_s, busy_s, flops}`` over [0, horizon_s]."""
        waits = sorted(self.waits_s)
        p95 = waits[min(len(waits) - 1, int(0.95 * len(waits)))] if waits else 0.0
        return {
            "requests": self.requests,
            "passes": self.passes,
            "mean_batch_size": self.requests / self.passes if self.passes else 0.0,
            "utilisation": self.busy_s / horizon_s if horizon_s > 0 else 0.0,
            "mean_queue_delay_s": sum(waits) / len(waits) if waits else 0.0,
            "p95_queue_delay_s": float(p95),
            "max_queue_delay_s": float(waits[-1]) if waits else 0.0,
            "busy_s": self.busy_s,
            "flops": self.flops,
        }


class EdgeBatchServer:
    """One edge server's compute: FCFS queue, greedy batches of at most ``max_batch``.

    Parameters
    ----------
    env : simpy.Environment
    flops_per_s : float
        Edge throughput F_edge [FLOP/s].
    max_batch : int
        Most requests served in one pass (>= 1).
    overhead_s : float
        Fixed duration of a pass s_0 [s] (>= 0).
    on_pass : callable, optional
        ``on_pass(start_s, duration_s, flops, batch_size)`` for each pass (event logging).
    """

    def __init__(self, env: simpy.Environment, flops_per_s: float, max_batch: int = 1, overhead_s: float = 0.0,
                 on_pass=None):
        if not flops_per_s > 0 or max_batch < 1 or overhead_s < 0:
            raise ValueError(f"EdgeBatchServer: flops_per_s={flops_per_s} (> 0), max_batch={max_batch} (>= 1), "
                             f"overhead_s={overhead_s} (>= 0)")
        self.env = env
        self.flops_per_s = float(flops_per_s)
        self.max_batch = int(max_batch)
        self.overhead_s = float(overhead_s)
        self.on_pass = on_pass
        self.stats = EdgeStats()
        self._waiting: list[tuple[float, float, simpy.Event]] = []
        self._busy = False

    def request(self, flops: float) -> simpy.Event:
        """Queue a request of ``flops``; the returned event fires with a :class:`Service` when
        its pass ends."""
        done = self.env.event()
        self._waiting.append((self.env.now, float(flops), done))
        self.stats.requests += 1
        if not self._busy:
            self._busy = True
            self.env.process(self._serve())
        return done

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def _serve(self):
        # let every request of this instant join first (a zero delay is scheduled after the
        # events already due now, so simultaneous arrivals share the first pass)
        yield self.env.timeout(0.0)
        while self._waiting:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
            flops = sum(f for _, f, _ in batch)
            duration = self.overhead_s + flops / self.flops_per_s
            start = self.env.now
            for arrived, _, _ in batch:
                self.stats.waits_s.append(start - arrived)
            if self.on_pass is not None:
                self.on_pass(start, duration, flops, len(batch))
            yield self.env.timeout(duration)
            self.stats.passes += 1
            self.stats.busy_s += duration
            self.stats.flops += flops
            for arrived, _, done in batch:
                done.succeed(Service(start - arrived, start, duration, len(batch)))
        self._busy = False
