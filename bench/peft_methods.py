"""PEFT methods side by side on all-MiniLM-L6-v2: payload, counted FLOPs, job memory, step time.

One process loads the checkpoint once and wraps a copy with each method (fomo.models.apply_peft):
LoRA r=8 on query/value (the reference), prompt tuning and prefix tuning with 8 virtual tokens,
IA3 on key/value/output.dense (input scaling of output.dense, peft's BERT default), BitFit, and
LoRA on an int8 or nf4 quantised base. The batch is the first ``--batch`` BBC News articles,
padded/truncated to ``--tokens`` tokens. For each method:

* ``payload_bytes``: the trainable tensors (adapter + head) a device uploads per round;
* ``flops_per_step``: counted forward + backward FLOPs (fomo.profiling.count_step_flops);
* ``memory_bytes``: the job memory deftsim charges a device (weights at their stored precision
  + trainable x (1 gradient + 2 AdamW moments) + saved activations);
* ``step_s``: wall seconds of one forward + backward + AdamW step, the minimum over
  ``--repeats`` rounds in which every method runs once (round-robin, so drifts in machine load
  hit all methods alike); a host measurement, not part of any simulated time.

Each ``*_vs_lora`` is the ratio to LoRA measured in the same process.

    python bench/peft_methods.py [--quick] [--batch 8] [--tokens 32] [--repeats 5]

Prints one ``RESULT method=<name> payload_bytes=... payload_vs_lora=... flops_per_step=...
flops_vs_lora=... memory_bytes=... memory_vs_lora=... step_s=... step_vs_lora=...`` line per
method.
"""
from __future__ import annotations

import argparse
import copy
import time

from _common import result_line, set_threads

METHODS = {
    "lora": {},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 8},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 8},
    "ia3": {"method": "ia3", "target_modules": ["key", "value", "output.dense"],
            "feedforward_modules": ["output.dense"]},
    "bitfit": {"method": "bitfit"},
    "qlora_int8": {"base_quantization": "int8"},
    "qlora_nf4": {"base_quantization": "nf4"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="default 5; quick 2")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    threads = set_threads()

    import torch

    from fomo import models, profiling
    from fomo.data import load_bbc_news
    from netsim.scenario import ModelSpec, PeftSpec

    texts, labels, classes = load_bbc_news()
    torch.manual_seed(0)
    tokenizer, base = models.load_base(ModelSpec(), len(classes))
    enc = tokenizer(texts[: args.batch], padding="max_length", truncation=True, max_length=args.tokens,
                    return_tensors="pt")
    batch = (enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels[: args.batch], dtype=torch.long))

    built = {}
    for name, peft in METHODS.items():
        torch.manual_seed(1)
        model = models.apply_peft(copy.deepcopy(base), PeftSpec(**peft))
        trainable = [p for _, p in models.trainable_parameters(model)]
        profile = profiling.count_step_flops(model, *batch)
        payload = models.tensor_bytes(trainable)
        memory = profiling.job_memory_bytes(profiling.weights_bytes(model), payload, "adamw",
                                            profile.saved_activation_bytes)
        built[name] = {"model": model, "optimizer": torch.optim.AdamW(trainable, lr=1e-3),
                       "payload_bytes": payload, "flops_per_step": profile.flops, "memory_bytes": memory,
                       "times": []}

    for _ in range(repeats):
        for entry in built.values():
            t0 = time.perf_counter()
            loss = profiling.classification_loss(entry["model"], *batch)
            entry["optimizer"].zero_grad()
            loss.backward()
            entry["optimizer"].step()
            entry["times"].append(time.perf_counter() - t0)

    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.tokens} tokens, {threads} torch threads, "
          f"{repeats} repeats")
    ref = built["lora"]
    ref_step = min(ref["times"])
    for name, entry in built.items():
        step = min(entry["times"])
        print(result_line(method=name, payload_bytes=entry["payload_bytes"],
                          payload_vs_lora=entry["payload_bytes"] / ref["payload_bytes"],
                          flops_per_step=entry["flops_per_step"],
                          flops_vs_lora=entry["flops_per_step"] / ref["flops_per_step"],
                          memory_bytes=entry["memory_bytes"],
                          memory_vs_lora=entry["memory_bytes"] / ref["memory_bytes"],
                          step_s=step, step_vs_lora=step / ref_step))


if __name__ == "__main__":
    main()
