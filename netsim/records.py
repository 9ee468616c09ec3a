"""The event log: one tidy row per simulated event.

Columns (units in names): ``t_s`` start time, ``duration_s``, ``kind``, ``node`` (the entity the
energy is charged to), ``peer``, ``round``, ``bytes`` (payload), ``memory_bytes`` (job memory),
``flops``, ``energy_j``, ``loss``, ``accuracy``, ``group`` (the device group's name),
``server`` (the name of the device's edge server), and on the uplinks of the asynchronous
protocols ``model_version`` (the global version the update was trained on) and ``staleness``
(server steps between that version and the update's arrival); -1 where they do not apply. ``group`` and ``server`` are set on a
device's own events (``node`` = the device) and empty strings on the others, so the log can be
sliced by group or server without joining topology.json. Event kinds:

================  =====================================================
``round_start``   edge starts a round (``node`` = edge)
``broadcast``     edge sends the global adapter (``node`` = edge, tx energy)
``downlink``      a device receives the broadcast (``node`` = device, rx energy)
``compute``       a device's local steps (``node`` = device)
``uplink``        a device uploads its update over its FDMA share
``memory_exceeded``  a selected device cannot hold the job; it sits the round out
``update_dropped``  a device went offline before its upload ended: its update is lost
``update_late``   the round closed (deadline, over-selection) before the device's update counted
``update_stale``  asynchronous: an update older than ``async_fl.max_staleness`` was discarded
``idle``          a device that delivered waits for the round to close (``idle_power_w``)
``handover``      mobility: the device moved from ``server`` to ``peer``
``not_scheduled`` AirComp: a device outside ``aircomp.interior_radius_m`` (not used that round)
``aggregate``     FedAvg at the edge
``distill``       the edge distils the emulator (Offsite-Tuning; before the first round)
``emulator_broadcast``  the edge multicasts the emulator once (``node`` = edge); each device's
                  reception is a ``downlink`` event of round 0
``edge_wait``     split: a device waits for the edge's pass on its step (queueing + service)
``edge_compute``  split: one pass of the edge over a batch of devices' steps (``node`` = edge)
``evaluate_emulator``  accuracy of the emulator itself (an instrument, no simulated time)
``evaluate``      test accuracy of the global model (round 0: before training)
``round_end``     end of a round
================  =====================================================
"""
from __future__ import annotations

import math
from typing import Any

COLUMNS = ["t_s", "duration_s", "kind", "node", "peer", "round", "bytes", "memory_bytes", "flops", "energy_j", "loss",
           "accuracy", "group", "server", "model_version", "staleness"]
STRING_COLUMNS = ("kind", "node", "peer", "group", "server")
INT_COLUMNS = ("round", "bytes", "memory_bytes", "model_version", "staleness")


class Recorder:
    """Collects events in the order they happen; ``to_frame()`` gives a pandas DataFrame."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def emit(self, kind: str, *, t_s: float, node: str, round: int, duration_s: float = 0.0, peer: str = "",
             bytes: int = 0, memory_bytes: int = 0, flops: float = 0.0, energy_j: float = 0.0, loss: float = math.nan,
             accuracy: float = math.nan, group: str = "", server: str = "", model_version: int = -1,
             staleness: int = -1) -> int:
        """Append one event; returns its row index."""
        self.rows.append((float(t_s), float(duration_s), kind, node, peer, int(round), int(bytes), int(memory_bytes), float(flops),
                          float(energy_j), float(loss), float(accuracy), str(group), str(server), int(model_version),
                          int(staleness)))
        return len(self.rows) - 1

    def fill(self, row: int, *, loss: float) -> None:
        """Set the ``loss`` of an emitted row (a job's loss is known only once its values are
        computed, after its ``compute`` event was logged; see :mod:`netsim.engine`)."""
        self._set(row, loss=float(loss))

    def tag(self, row: int, *, model_version: int, staleness: int) -> None:
        """Set the version and staleness of an emitted uplink (known when it arrives)."""
        self._set(row, model_version=int(model_version), staleness=int(staleness))

    def cut(self, row: int, end_s: float) -> None:
        """End an emitted event early at ``end_s`` (its device stopped: the round closed, or
        the run ended): the duration becomes end_s - t_s and the energy shrinks in proportion."""
        t_s, duration = self.rows[row][0], self.rows[row][1]
        if end_s >= t_s + duration:
            return
        kept = max(end_s - t_s, 0.0)
        energy = self.rows[row][COLUMNS.index("energy_j")]
        self._set(row, duration_s=kept, energy_j=energy * kept / duration if duration > 0 else energy)

    def finish(self, row: int, *, duration_s: float, energy_j: float) -> None:
        """Set the duration and energy of an emitted event whose end was not known when it
        started (a wait for a shared server)."""
        self._set(row, duration_s=float(duration_s), energy_j=float(energy_j))

    def _set(self, row: int, **fields) -> None:
        values = list(self.rows[row])
        for name, value in fields.items():
            values[COLUMNS.index(name)] = value
        self.rows[row] = tuple(values)

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame.from_records(self.rows, columns=COLUMNS)
        if not self.rows:   # an empty log keeps the column types of a non-empty one
            frame = frame.astype({c: ("int64" if c in INT_COLUMNS else "float64") for c in COLUMNS
                                  if c not in STRING_COLUMNS})
        return frame.astype({c: "string" for c in STRING_COLUMNS})
