"""Quickstart: wall time per real PEFT step and the share of wall time outside PyTorch.

Runs the quickstart scenario (``--rounds`` overrides its round limit) with the real trainer
wrapped in a timing proxy. Everything inside ``execute``/``evaluate``/``aggregate`` is
PyTorch work; the rest of the run (SimPy events, channel maths, recording, writing results) is
simulator overhead.

    python bench/quickstart_overhead.py [--rounds N] [--threads N | --torch-default-threads]

Threads: deftsim's thread policy (deftsim/threads.py: the available physical cores up to 8,
or ``--threads N`` / ``DEFTSIM_TORCH_THREADS``; OpenMP passive wait), applied before torch is
imported; ``--torch-default-threads`` leaves torch's own choice (active wait) instead.

Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class TimedTrainer:
    """Forwards every call to the real trainer and adds up the wall time spent inside it."""

    def __init__(self, inner):
        self.inner = inner
        self.torch_s = 0.0
        self.steps = 0
        self.train_s = 0.0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            dt = time.perf_counter() - t0
            self.torch_s += dt
            if name in ("execute", "local_train"):   # the engine calls execute(plans)
                self.train_s += dt
                self.steps += sum(getattr(job, "job", job).steps for job in args[0])
            return out

        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: deftsim's policy)")
    ap.add_argument("--torch-default-threads", action="store_true",
                    help="torch's own thread count and OpenMP's default wait policy")
    args = ap.parse_args()
    if args.torch_default_threads:
        import torch

        threads = f"torch_threads={torch.get_num_threads()} wait=torch_default"
    else:
        from deftsim.threads import configure_threads, describe

        record = configure_threads(args.threads)  # before torch is imported
        print(describe(record))
        threads = f"torch_threads={record['torch_threads']} wait={record['omp_wait_policy']}"
    import deftsim.build as build
    import deftsim.runner as runner
    from deftsim.config import load_scenario

    overrides = [f"training.rounds={args.rounds}"] if args.rounds else []
    scenario = load_scenario(ROOT / "scenarios" / "quickstart.yaml", overrides)
    timed = {}
    original = build.make_trainer

    def make(sc, seed):
        t0 = time.perf_counter()
        inner = original(sc, seed)  # model loading, tokenization: PyTorch/HF work, not simulator
        timed["t"] = TimedTrainer(inner)
        timed["t"].torch_s += time.perf_counter() - t0
        timed["setup_s"] = time.perf_counter() - t0
        return timed["t"]

    build.make_trainer = make
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = runner.run_scenario(scenario, out)
        total = time.perf_counter() - t0
    t = timed["t"]
    outside = total - t.torch_s
    print(f"rounds={summary['rounds_completed']} final_accuracy={summary['final_accuracy']:.3f}")
    print(f"setup (model + data loading) {timed['setup_s']:.2f} s")
    print(f"wall: total {total:.2f} s, inside PyTorch {t.torch_s:.2f} s (training {t.train_s:.2f} s for "
          f"{t.steps} steps), outside {outside:.2f} s")
    print(f"RESULT wall_s={total:.2f} ms_per_step={1000 * t.train_s / max(t.steps, 1):.1f} "
          f"outside_torch_share={outside / total:.4f} steps={t.steps} {threads}")


if __name__ == "__main__":
    main()
