"""The prompt library's forward on the host: P soft prompts on one batch as one batched forward
(``fomo.service_tuner.TaskTuner.library_probabilities``, through
``fomo.prompt_ensemble.library_predictions``) against P separate forwards of one prompt each,
in the same process, alternating, best of 5.

This is the work the ``ensemble`` and ``best_single`` variants of experiment ``prompt_service``
do for every probe batch, and the test-set probabilities of new library entries. The simulated
timeline charges P forward passes either way (the counted FLOPs are equal; checked here); only
the host's wall time differs. Also reports one tuning step's wall time as the baseline unit.

    python bench/prompt_library.py [--quick]

``--quick``: P in (4, 16) instead of (4, 16, 32). Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, min_of_alternating, result_line, set_threads  # noqa: E402

TASK = "tweets_sentiment/nfl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    threads = set_threads()
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from fomo.service_tuner import TaskTuner
    from netsim.scenario import Scenario

    sc = Scenario.model_validate({"peft": {"method": "prompt_tuning", "num_virtual_tokens": 8},
                                  "model": {"max_length_tokens": 32},
                                  "training": {"batch_size": 8, "learning_rate": 0.1}})
    tuner = TaskTuner(sc, 0, [TASK], test_examples=64)
    examples = tuner.draw_examples(TASK, 8, np.random.default_rng(0))
    generator = torch.Generator().manual_seed(0)
    fresh = tuner.fresh_state()
    print(f"host: {threads} torch threads, load average {load_average()}; batch 8 tweets of {TASK}, "
          f"all-MiniLM-L6-v2 with an 8-token soft prompt")
    print(f"{'P':>4} {'batched [ms]':>13} {'separate [ms]':>14} {'speed-up':>9}  same FLOPs")
    out = {}
    for p in ((4, 16) if args.quick else (4, 16, 32)):
        states = [{n: t + 0.02 * torch.randn(t.shape, generator=generator) for n, t in fresh.items()}
                  for _ in range(p)]
        _, batched_flops = tuner.library_probabilities(states, TASK, examples)
        separate_flops = sum(tuner.library_probabilities([s], TASK, examples)[1] for s in states)
        times = min_of_alternating({
            "batched": lambda: tuner.library_probabilities(states, TASK, examples),
            "separate": lambda: [tuner.library_probabilities([s], TASK, examples) for s in states]}, repeats=5)
        speedup = times["separate"] / times["batched"]
        same = batched_flops == separate_flops
        print(f"{p:>4} {1e3 * times['batched']:>13.1f} {1e3 * times['separate']:>14.1f} {speedup:>8.2f}x  {same}")
        out[f"speedup_p{p}"] = speedup
        out[f"same_flops_p{p}"] = int(same)
    job = tuner.start_job(TASK, fresh)
    step = min_of_alternating({"step": lambda: job.step(examples)}, repeats=5)["step"]
    print(f"one tuning step on the same batch: {1e3 * step:.1f} ms")
    print(result_line(**out, tuning_step_ms=1e3 * step))


if __name__ == "__main__":
    main()
