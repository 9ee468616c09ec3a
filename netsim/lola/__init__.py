"""LoLa cooperative fine-tuning: depth-aware block-device allocation (torch-free).

``allocation``  the problem instance, CRUNCH, JBBA and the baselines
``profile``     the per-block depth cost profile and its analytic fallback
The SimPy rounds per algorithm on the scenario's devices and channels are the protocol
:mod:`netsim.protocols.lola`.
"""
from .allocation import ALGORITHMS, Allocation, Instance, InfeasibleError, allocate, crunch, crunch_matching, jbba
from .profile import DepthProfile, analytic_profile, split_layers

__all__ = ["ALGORITHMS", "Allocation", "DepthProfile", "Instance", "InfeasibleError", "allocate", "analytic_profile",
           "crunch", "crunch_matching", "jbba", "split_layers"]
