"""The event log: one tidy row per simulated event.

Columns (units in names): ``t_s`` start time, ``duration_s``, ``kind``, ``node`` (the entity the
energy is charged to), ``peer``, ``round``, ``bytes`` (payload), ``memory_bytes`` (job memory),
``flops``, ``energy_j``, ``loss``, ``accuracy``, ``group`` (the device group's name) and
``server`` (the name of the device's edge server). ``group`` and ``server`` are set on a
device's own events (``node`` = the device) and empty strings on the others, so the log can be
sliced by group or server without joining topology.json. Event kinds:

================  =====================================================
``round_start``   edge starts a round (``node`` = edge)
``broadcast``     edge sends the global adapter (``node`` = edge, tx energy)
``downlink``      a device receives the broadcast (``node`` = device, rx energy)
``compute``       a device's local steps (``node`` = device)
``uplink``        a device uploads its update over its FDMA share
``memory_exceeded``  a selected device cannot hold the job; it sits the round out
``not_scheduled`` AirComp: a device outside ``aircomp.interior_radius_m`` (not used that round)
``aggregate``     FedAvg at the edge
``evaluate``      test accuracy of the global model (round 0: before training)
``round_end``     end of a round
================  =====================================================
"""
from __future__ import annotations

import math
from typing import Any

COLUMNS = ["t_s", "duration_s", "kind", "node", "peer", "round", "bytes", "memory_bytes", "flops", "energy_j", "loss",
           "accuracy", "group", "server"]
STRING_COLUMNS = ("kind", "node", "peer", "group", "server")


class Recorder:
    """Collects events in the order they happen; ``to_frame()`` gives a pandas DataFrame."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def emit(self, kind: str, *, t_s: float, node: str, round: int, duration_s: float = 0.0, peer: str = "",
             bytes: int = 0, memory_bytes: int = 0, flops: float = 0.0, energy_j: float = 0.0, loss: float = math.nan,
             accuracy: float = math.nan, group: str = "", server: str = "") -> int:
        """Append one event; returns its row index."""
        self.rows.append((float(t_s), float(duration_s), kind, node, peer, int(round), int(bytes), int(memory_bytes), float(flops),
                          float(energy_j), float(loss), float(accuracy), str(group), str(server)))
        return len(self.rows) - 1

    def fill(self, row: int, *, loss: float) -> None:
        """Set the ``loss`` of an emitted row (a job's loss is known only once its values are
        computed, after its ``compute`` event was logged; see :mod:`netsim.engine`)."""
        values = list(self.rows[row])
        values[COLUMNS.index("loss")] = float(loss)
        self.rows[row] = tuple(values)

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame.from_records(self.rows, columns=COLUMNS)
        return frame.astype({c: "string" for c in STRING_COLUMNS})
