"""The protocols: SimPy processes that move a round's work over the network, one module each.

- ``fedavg``: federated PEFT with FedAvg over OFDMA (digital) uplinks;
- ``aircomp_fedavg``: the same with the uplink aggregated over the air (broadband analog
  aggregation);
- ``neural_aircomp``: split fine-tuning whose edge layer consumes the over-the-air sum of the
  devices' features;
- ``lola``: LoLa cooperative fine-tuning, one simulated run per block-allocation algorithm.
"""
