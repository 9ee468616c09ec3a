"""deftsim: device-edge fine-tuning co-simulator (command line and wiring).

``netsim`` is the network side (SimPy), ``fomo`` the real PEFT trainer, ``analysis`` the
results; this package loads scenario files, wires them together and writes results.
"""
__version__ = "0.1.0"
