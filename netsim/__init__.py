"""netsim: the network side of deftsim (SimPy timeline, channels, devices). Never imports torch.

Start reading at :mod:`netsim.scenario` (what a scenario holds), then :mod:`netsim.protocols.fedavg`
(the protocol on the SimPy timeline), :mod:`netsim.network` and :mod:`netsim.channel`.
"""
from .fake_trainer import FakeTrainer
from .protocols.fedavg import FedAvgSimulation, RunOutcome
from .interfaces import EvalResult, LocalJob, LocalResult, Trainer
from .network import Network
from .records import COLUMNS, Recorder
from .scenario import Scenario

__all__ = [
    "COLUMNS",
    "EvalResult",
    "FakeTrainer",
    "FedAvgSimulation",
    "LocalJob",
    "LocalResult",
    "Network",
    "Recorder",
    "RunOutcome",
    "Scenario",
    "Trainer",
]
