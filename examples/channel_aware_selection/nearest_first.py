"""Nearest-first selection: of the candidates whose local training finishes soonest, the k
with the best mean uplink SNR (a channel- and compute-aware deftsim selection strategy)."""
import math

import numpy as np
from pydantic import Field

from netsim.spec_base import Float, Spec
from netsim.strategies import SelectionStrategy


class NearestFirst(SelectionStrategy):
    class Params(Spec):
        pool_factor: Float = Field(2.0, ge=1.0, le=1000.0, description="pool = the ceil(pool_factor k) fastest")

    def choose(self, candidates, k, ctx):
        pool = min(len(candidates), math.ceil(self.params.pool_factor * k))
        speed = ctx.compute_flops_per_s[candidates]
        fastest = candidates[np.argsort(-speed, kind="stable")[:pool]]
        snr_db = ctx.mean_uplink_snr_db[fastest]
        return fastest[np.argsort(-snr_db, kind="stable")[:k]]
