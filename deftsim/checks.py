"""Scenario checks that need files (data set, model folder) but not torch, and warnings about
settings that have no effect.

:func:`check_scenario_resources` is run by ``deftsim validate`` and before ``deftsim run``; it
raises ``ValueError`` with a message naming the field, the value and what is allowed.
:func:`settings_warnings` lists the fields a scenario sets that nothing reads.
"""
from __future__ import annotations

from typing import Any, Iterator

from pydantic import BaseModel

from fomo.checkpoint import (ALL_LINEAR, HEAD_MODULES, CheckpointInfo, adaptable_modules, check_head_fits,
                             check_model_source, config_depth, decoder_lora_targets, read_config)
from netsim.scenario import Scenario

LORA_EXPERIMENTS = ("fedavg", "aircomp_vs_ofdma", "lola_compare", "federated_deft")
"""Experiments that fine-tune with ``peft`` (neural_aircomp trains its own projections)."""


ALL_PEFT_METHODS = ("lora", "prompt_tuning", "ia3", "prefix_tuning", "bitfit")
"""Every ``peft.method`` value (netsim.scenario.PeftSpec)."""

PEFT_METHODS_BY_EXPERIMENT: dict[str, tuple[str, ...]] = {
    "fedavg": ALL_PEFT_METHODS,
    "aircomp_vs_ofdma": ALL_PEFT_METHODS,
    "lola_compare": ("lora",),                          # per-block LoRA depth profile and block training
    "prompt_service": ("lora", "prompt_tuning"),        # prompt libraries of soft prompts or LoRA states
    "d2d_prompt_transfer": ("lora", "prompt_tuning"),
}
"""The ``peft.method`` values each experiment runs (``neural_aircomp`` trains no PEFT method;
``federated_deft``: per variant, :data:`PEFT_METHODS_BY_DEFT_VARIANT`)."""

PEFT_METHODS_BY_DEFT_VARIANT: dict[str, tuple[str, ...]] = {
    "lora": ALL_PEFT_METHODS,                           # the plain trainer with the peft section's method
    "split": ALL_PEFT_METHODS,                          # trains its own prompt; the peft section is ignored
    "emulator": ("lora", "prompt_tuning"),              # adapters plugged in by module name, blocks dropped
    "zeroth_order": ("lora", "prompt_tuning"),
}
"""The ``peft.method`` values each ``federated_deft`` variant runs."""

QUANTIZED_BASE_EXPERIMENTS = ("fedavg", "aircomp_vs_ofdma")
"""Experiments that run LoRA on a quantised base (``peft.base_quantization`` int8 / nf4); in
``federated_deft`` its ``lora`` variant (the plain trainer) only."""


def check_peft_method(scenario: Scenario) -> None:
    """``peft.method`` and ``peft.base_quantization`` must be ones the experiment (and, for
    ``federated_deft``, each of its variants) runs; ValueError naming the field, its value and
    the allowed values otherwise. Applies to ``trainer: real`` and to ``lola_compare`` with any
    trainer (its analytic profile is LoRA's)."""
    exp, peft = scenario.experiment, scenario.peft
    if exp == "neural_aircomp" or (scenario.trainer != "real" and exp != "lola_compare"):
        return
    if exp == "federated_deft":
        pairs = [(f"experiment 'federated_deft' with variant {v!r}", PEFT_METHODS_BY_DEFT_VARIANT[v],
                  v == "lora") for v in scenario.federated_deft.variants]
    else:
        pairs = [(f"experiment {exp!r}", PEFT_METHODS_BY_EXPERIMENT.get(exp, ALL_PEFT_METHODS),
                  exp in QUANTIZED_BASE_EXPERIMENTS)]
    for what, allowed, quantized_ok in pairs:
        if peft.method not in allowed:
            raise ValueError(f"peft.method={peft.method!r}: {what} runs {' and '.join(allowed)} only; allowed: "
                             f"{list(allowed)}")
        if peft.base_quantization != "none" and not quantized_ok:
            raise ValueError(f"peft.base_quantization={peft.base_quantization!r}: {what} runs LoRA on a float base "
                             f"only (a quantised base runs in experiments {list(QUANTIZED_BASE_EXPERIMENTS)} and "
                             "federated_deft's 'lora' variant); allowed: 'none'")


def model_depth(model_dir: str) -> int:
    """Number of transformer blocks from the checkpoint's config.json (an integer in 1..1024;
    ValueError naming model.path and config.json otherwise)."""
    return config_depth(read_config(model_dir), model_dir)


def check_rank_per_layer(rank_per_layer, depth: int) -> None:
    """``peft.rank_per_layer`` against the model depth: a list needs exactly one rank per block,
    a mapping only indices 0..depth-1."""
    if rank_per_layer is None:
        return
    if isinstance(rank_per_layer, list):
        if len(rank_per_layer) != depth:
            raise ValueError(f"peft.rank_per_layer={rank_per_layer}: {len(rank_per_layer)} entries but the model has "
                             f"{depth} blocks; give one rank per block (0 = not trainable) or a mapping "
                             "{block index: rank}")
        return
    bad = sorted(i for i in rank_per_layer if i >= depth)
    if bad:
        raise ValueError(f"peft.rank_per_layer={rank_per_layer}: block(s) {bad} do not exist; the model has "
                         f"{depth} blocks, allowed indices 0..{depth - 1}")


def _module_matches(module: str, target: str) -> bool:
    """peft's rule (name equals the target or ends with "." + target), applied to a module name
    of the weights file; also true when the target is a longer, prefixed form of the name (the
    loaded model prefixes e.g. ``bert.``)."""
    return module == target or module.endswith("." + target) or target.endswith("." + module)


def check_target_modules(info: CheckpointInfo, targets: list[str]) -> None:
    """Every ``peft.target_modules`` entry must name a layer of the checkpoint that LoRA can
    adapt: a module owning a 2-D ``weight`` in the weights file (linear layers, GPT-2's Conv1D,
    embeddings) or the classification head transformers adds (:data:`HEAD_MODULES`). Skipped
    for ``pytorch_model.bin`` weights (their names need torch; the trainer checks them)."""
    if info.shapes is None:
        return
    modules = adaptable_modules(info.shapes)
    unknown = [t for t in targets
               if t != ALL_LINEAR and t not in HEAD_MODULES and not any(_module_matches(m, t) for m in modules)]
    if unknown:
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise ValueError(f"peft.target_modules={targets}: {unknown} match no layer of {info.weights_file} in "
                         f"model.path={info.folder!r} that LoRA can adapt (linear, Conv1D or embedding layers, "
                         f"all supported by peft's LoRA); its layers end in: {', '.join(suffixes)} "
                         f"(or use {ALL_LINEAR!r})")


def check_scenario_resources(scenario: Scenario) -> None:
    """Checks of a ``trainer: real`` scenario against its files, without torch: the model folder
    (:func:`fomo.checkpoint.check_checkpoint`), ``peft.layers`` / ``peft.rank_per_layer`` against
    its depth, ``peft.target_modules`` against its layers, and the data (readable, has the
    columns, >= 2 classes, fits the devices; a saved head fits the classes). For every
    trainer: an availability trace (readable, names only devices of the scenario) and, for the
    fake trainer, a round deadline no round can meet (the real trainer's job FLOPs are only
    known once the model is loaded: ``deftsim run`` checks it then)."""
    if scenario.data.task is not None:   # the name, for every trainer (the real one also loads it below)
        from fomo.tasks import get_task

        get_task(scenario.data.task)
    _check_dynamics(scenario)
    check_peft_method(scenario)
    if scenario.trainer != "real":
        return
    if scenario.execution.device == "cuda":   # a GPU must exist (torch, imported only here)
        from fomo.execution import check_execution

        check_execution(scenario.execution)
    causal = scenario.model.objective == "causal_lm"
    info = check_model_source(scenario.model.objective, scenario.model.path)
    depth = info.depth
    bad = [layer for layer in (scenario.peft.layers or []) if layer >= depth]
    if bad:
        raise ValueError(f"peft.layers={scenario.peft.layers}: block(s) {bad} do not exist; the model has "
                         f"{depth} blocks, allowed indices 0..{depth - 1}")
    check_rank_per_layer(scenario.peft.rank_per_layer, depth)
    if scenario.experiment == "federated_deft":
        check_deft_depth(scenario, depth)
    if scenario.experiment == "prompt_service":
        check_service_tasks(scenario)
        return
    if scenario.experiment == "d2d_prompt_transfer":
        check_d2d_tasks(scenario)
        check_d2d_graph(scenario)
        return
    uses_targets = scenario.experiment in LORA_EXPERIMENTS and scenario.peft.method in ("lora", "ia3")
    if uses_targets:
        targets = list(scenario.peft.target_modules)
        if causal and info.shapes is not None:
            targets = decoder_lora_targets(targets, adaptable_modules(info.shapes))
        check_target_modules(info, targets)
    from fomo.data import check_data_fits

    num_classes = check_data_fits(scenario)
    if scenario.experiment in LORA_EXPERIMENTS and not causal:
        check_head_fits(info, num_classes)


def check_service_tasks(scenario: Scenario) -> None:
    """The ``prompt_service`` tasks without torch: every task is registered and installed, all
    share one label set, and each holds enough labelled examples besides its test set for a
    request (``examples_per_request``) and, for a library task, its entry (``library.examples``)."""
    spec = scenario.prompt_service
    library = set(spec.library.tasks)
    requested = {t for c in spec.user_classes for t in c.tasks}
    entries = []
    for name in spec.all_tasks():
        needs = [("prompt_service.examples_per_request", spec.examples_per_request)] if name in requested else []
        if name in library:
            needs.append(("prompt_service.library.examples", spec.library.examples))
        where = "prompt_service.library.tasks" if name in library else "prompt_service.user_classes.*.tasks"
        entries.append((name, where, needs))
    _check_tasks(entries, spec.test_examples, "every request")


def check_d2d_tasks(scenario: Scenario) -> None:
    """The ``d2d_prompt_transfer`` tasks without torch: registered and installed, one label set,
    enough labelled examples besides the test set for a source prompt (``source_examples``)
    and a target (``examples_per_device``)."""
    spec = scenario.d2d_prompt_transfer
    zone_tasks, new = set(spec.tasks), set(spec.target_tasks or spec.tasks)
    entries = []
    for name in spec.all_tasks():
        needs = [("d2d_prompt_transfer.source_examples", spec.source_examples)] if name in zone_tasks else []
        if name in new:
            needs.append(("d2d_prompt_transfer.examples_per_device", spec.examples_per_device))
        where = "d2d_prompt_transfer.tasks" if name in zone_tasks else "d2d_prompt_transfer.target_tasks"
        entries.append((name, where, needs))
    _check_tasks(entries, spec.test_examples, "every device's prompt")


def check_d2d_graph(scenario: Scenario) -> None:
    """The drop's D2D graph has at least one sidelink (built without torch: positions and
    links only, O(N^2) for the ``distance`` kind)."""
    from netsim.network import Network
    from netsim.protocols.d2d_prompt_transfer import no_sidelink_error

    error = no_sidelink_error(scenario, Network(scenario, scenario.network_seed(scenario.seed)))
    if error:
        raise ValueError(error)


def _check_tasks(entries: list[tuple[str, str, list[tuple[str, int]]]], test_examples: int, served: str) -> None:
    """Each ``(task, field that names it, [(count field, count)])``: the task loads, shares the
    first task's label set, and holds each count of labelled examples besides its test set."""
    from fomo.tasks import load_task

    reference = None
    for name, where, needs in entries:
        try:
            texts, _, classes = load_task(name)
        except ValueError as err:
            raise ValueError(f"{where}: {str(err).replace('data.task=', 'task ')}") from None
        if reference is None:
            reference = (name, classes)
        elif classes != reference[1]:
            raise ValueError(f"{where}: task {name!r} has classes {classes}, task {reference[0]!r} has "
                             f"{reference[1]}; allowed: tasks with one label set (one classification head serves "
                             f"{served})")
        pool = len(texts) - min(test_examples, len(texts) // 5)
        for field, count in needs:
            if count > pool:
                raise ValueError(f"{field}={count}: task {name!r} has {pool} labelled examples besides its "
                                 f"{len(texts) - pool} test examples; allowed: 1..{pool}")


def check_deft_depth(scenario: Scenario, depth: int) -> None:
    """The ``federated_deft`` variants' block counts against the model's depth: the emulator
    needs 2 adapter_layers + emulator_layers <= depth (at least one middle block to compress),
    the split cut at most the depth."""
    variants = scenario.federated_deft.variants
    emu = scenario.emulator
    if "emulator" in variants:
        if 2 * emu.adapter_layers >= depth:
            raise ValueError(f"emulator.adapter_layers={emu.adapter_layers}: the model has {depth} blocks, so at most "
                             f"{(depth - 1) // 2} adapter layers on each side leave a middle to compress; allowed: "
                             f"1..{(depth - 1) // 2}")
        middle = depth - 2 * emu.adapter_layers
        if emu.emulator_layers > middle:
            raise ValueError(f"emulator.emulator_layers={emu.emulator_layers}: more emulator layers than the model has "
                             f"between its adapters ({depth} blocks - 2 x {emu.adapter_layers} adapter layers = "
                             f"{middle} middle blocks); allowed: 1..{middle}")
    if "split" in variants and scenario.split.cut_layer > depth:
        raise ValueError(f"split.cut_layer={scenario.split.cut_layer}: the model has {depth} blocks; allowed: "
                         f"0..{depth}")


def _check_dynamics(scenario: Scenario) -> None:
    from netsim.dynamics import load_availability_trace
    from netsim.protocols.fedavg import deadline_error

    spec = scenario.dynamics.availability
    if spec.model == "trace":
        load_availability_trace(spec.trace_path, scenario.num_devices,
                                [f"dev{i}" for i in range(scenario.num_devices)])
    if scenario.trainer == "fake" and scenario.experiment == "fedavg":
        error = deadline_error(scenario, scenario.fake.step_flops * scenario.training.local_steps)
        if error:
            raise ValueError(error)


# --------------------------------------------------------------------------------------------
# Settings without effect
# --------------------------------------------------------------------------------------------
def explicit_fields(section: BaseModel) -> dict[str, Any]:
    """Fields of a scenario section that the file (or ``--set``, or a sweep) sets to a value
    other than the default: pydantic's ``model_fields_set``, less the fields whose value equals
    the default (an override into a section the file leaves out copies the section's defaults,
    which set nothing)."""
    out: dict[str, Any] = {}
    fields = type(section).model_fields
    for name in sorted(section.model_fields_set):
        value = getattr(section, name)
        if value != fields[name].get_default(call_default_factory=True):
            out[name] = value
    return out


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ignored(prefix: str, section: BaseModel, names: tuple[str, ...] | None, reason: str) -> Iterator[str]:
    """One message per field of ``section`` in ``names`` (None: every field) set explicitly."""
    for name, value in explicit_fields(section).items():
        if names is None or name in names:
            yield f"{prefix}.{name}={_short(value)} has no effect: {reason}"


def _peft_warnings(s: Scenario) -> Iterator[str]:
    if s.experiment == "neural_aircomp":
        yield from _ignored("peft", s.peft, None, "experiment 'neural_aircomp' trains its own projections, not PEFT")
    else:
        used = PEFT_FIELDS_BY_METHOD[s.peft.method]
        for name in type(s.peft).model_fields:
            if name in used or name == "method":
                continue
            users = sorted(PEFT_METHOD_LABELS[m] for m, fields in PEFT_FIELDS_BY_METHOD.items() if name in fields)
            who = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} and {users[-1]}"
            yield from _ignored("peft", s.peft, (name,), f"{who} only, and peft.method is {s.peft.method!r}")


PEFT_FIELDS_BY_METHOD: dict[str, tuple[str, ...]] = {
    "lora": ("rank", "alpha", "dropout", "target_modules", "layers", "rank_per_layer", "base_quantization"),
    "prompt_tuning": ("num_virtual_tokens",),
    "prefix_tuning": ("num_virtual_tokens",),
    "ia3": ("target_modules", "feedforward_modules", "layers"),
    "bitfit": ("layers",),
}
"""The ``peft`` fields each method reads (the others have no effect)."""

PEFT_METHOD_LABELS = {"lora": "LoRA", "prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning",
                      "ia3": "IA3", "bitfit": "BitFit"}


def _data_warnings(s: Scenario) -> Iterator[str]:
    if s.data.partition == "iid":
        yield from _ignored("data", s.data, ("dirichlet_alpha",), "used with data.partition 'dirichlet' only, "
                            "and data.partition is 'iid'")
    if s.data.task is not None:
        yield from _ignored("data", s.data, ("path", "text_column", "label_column"),
                            "used with data.dataset 'csv' only, and data.task is set")
    elif s.data.dataset == "bbc_news":
        yield from _ignored("data", s.data, ("path", "text_column", "label_column"),
                            "used with data.dataset 'csv' only, and data.dataset is 'bbc_news'")
    if s.experiment == "neural_aircomp":
        yield from _ignored("data", s.data, ("partition", "dirichlet_alpha", "min_examples_per_device"),
                            "experiment 'neural_aircomp' splits every example across the devices, not the data set")


def _trainer_warnings(s: Scenario) -> Iterator[str]:
    if s.trainer == "real":
        # lola_compare's measured depth profile sizes its head with fake.num_classes
        keep = ("num_classes",) if s.experiment == "lola_compare" else ()
        names = tuple(n for n in type(s.fake).model_fields if n not in keep)
        yield from _ignored("fake", s.fake, names, "the parameters of trainer 'fake', and trainer is 'real'")
        if s.execution.strategy == "sequential":
            yield from _ignored("execution", s.execution, ("max_devices_per_pass",),
                                "batched only, and execution.strategy is 'sequential'")
        return
    yield from _ignored("execution", s.execution, None, "how the real trainer runs its steps, and trainer is 'fake'")
    yield from _ignored("model", s.model, ("path",), "the real trainer's checkpoint, and trainer is 'fake'")
    if s.experiment != "lola_compare":  # lola's analytic profile reads peft.rank and target_modules
        yield from _ignored("data", s.data, None, "trainer 'fake' has no data set (see fake.examples_per_device)")
        yield from _ignored("peft", s.peft, None, "trainer 'fake' has no model to adapt (see fake.adapter_bytes)")


def _experiment_warnings(s: Scenario) -> Iterator[str]:
    if s.lola is not None and s.experiment != "lola_compare":
        yield f"lola={_short(s.lola)} has no effect: used by experiment 'lola_compare' only, and experiment is " \
              f"{s.experiment!r}"
    if s.experiment != "neural_aircomp" and explicit_fields(s.neural_aircomp):
        yield f"neural_aircomp={_short(s.neural_aircomp)} has no effect: used by experiment 'neural_aircomp' only, " \
              f"and experiment is {s.experiment!r}"
    if s.experiment != "prompt_service" and explicit_fields(s.prompt_service):
        yield f"prompt_service={_short(s.prompt_service)} has no effect: used by experiment 'prompt_service' only, " \
              f"and experiment is {s.experiment!r}"
    if s.experiment == "prompt_service":
        yield from _ignored("data", s.data, None, "experiment 'prompt_service' reads its tasks from prompt_service")
        yield from _ignored("training", s.training, ("rounds", "local_steps", "devices_per_round", "mode"),
                            "federated rounds, and experiment 'prompt_service' serves requests (see prompt_service)")
        if s.peft.method != "prompt_tuning":
            yield f"peft.method={s.peft.method!r}: the service's library holds {s.peft.method} states, not soft " \
                  "prompts (set peft.method: prompt_tuning for prompt-ensemble tuning)"
    if s.experiment != "d2d_prompt_transfer" and explicit_fields(s.d2d_prompt_transfer):
        yield f"d2d_prompt_transfer={_short(s.d2d_prompt_transfer)} has no effect: used by experiment " \
              f"'d2d_prompt_transfer' only, and experiment is {s.experiment!r}"
    if s.experiment == "d2d_prompt_transfer":
        yield from _ignored("data", s.data, None, "experiment 'd2d_prompt_transfer' reads its tasks from "
                            "d2d_prompt_transfer")
        yield from _ignored("training", s.training, ("rounds", "local_steps", "devices_per_round", "mode", "topology"),
                            "federated rounds, and experiment 'd2d_prompt_transfer' tunes each target on its own")
        if s.peft.method != "prompt_tuning":
            yield f"peft.method={s.peft.method!r}: devices hold {s.peft.method} states, not soft prompts; their task " \
                  "embedding is every trainable tensor flattened (set peft.method: prompt_tuning for SPoT's " \
                  "prompt embedding)"
        if s.dynamics.mobility.model != "none":
            yield f"dynamics.mobility.model={s.dynamics.mobility.model!r} has no effect: experiment " \
                  "'d2d_prompt_transfer' uses the D2D graph at t = 0"
    for name in ("federated_deft", "emulator", "split", "zeroth_order"):
        section = getattr(s, name)
        if explicit_fields(section) and (s.experiment != "federated_deft" or (
                name != "federated_deft" and name not in s.federated_deft.variants)):
            why = (f"experiment is {s.experiment!r}" if s.experiment != "federated_deft"
                   else f"{name!r} is not in federated_deft.variants")
            yield f"{name}={_short(section)} has no effect: used by experiment 'federated_deft' only, and {why}"
    aircomp_used = s.experiment in ("aircomp_vs_ofdma", "neural_aircomp") or (
        s.experiment == "fedavg" and s.channel.uplink_access == "aircomp") or (
        s.experiment == "federated_deft" and s.zeroth_order.uplink_access == "aircomp"
        and "zeroth_order" in s.federated_deft.variants)
    if not aircomp_used:
        yield from _ignored("aircomp", s.aircomp, None,
                            f"over-the-air settings, and experiment {s.experiment!r} uses channel.uplink_access "
                            f"{s.channel.uplink_access!r}")
    elif s.experiment != "aircomp_vs_ofdma":
        yield from _ignored("aircomp", s.aircomp, ("device_counts",),
                            f"used by experiment 'aircomp_vs_ofdma' only, and experiment is {s.experiment!r}")
    if s.experiment == "aircomp_vs_ofdma":
        yield from _ignored("channel", s.channel, ("uplink_access",),
                            "experiment 'aircomp_vs_ofdma' runs both 'ofdma' and 'aircomp'")


def _lola_warnings(s: Scenario) -> Iterator[str]:
    if s.lola is None or s.experiment != "lola_compare":
        return
    lola = s.lola
    if lola.train_rounds == 0:
        yield from _ignored("lola", lola, ("train_algorithms",), "lola.train_rounds is 0 (latency only)")
    if "jbba" not in lola.algorithms:
        yield from _ignored("lola", lola, ("jbba_iterations",), "'jbba' is not in lola.algorithms")
    measured = lola.profile == "measured" or (lola.profile == "auto" and s.trainer == "real")
    if measured:
        yield from _ignored("lola", lola, ("analytic",), "the depth profile is measured on the real model "
                            f"(lola.profile {lola.profile!r}, trainer {s.trainer!r})")


def _radio_warnings(s: Scenario) -> Iterator[str]:
    if s.channel.pathloss.model != "log_distance":
        yield from _ignored("channel.pathloss", s.channel.pathloss, ("exponent", "ref_loss_db"),
                            f"log_distance only, and channel.pathloss.model is {s.channel.pathloss.model!r}")
    if s.d2d.kind != "distance":
        yield from _ignored("d2d", s.d2d, ("threshold_m",), f"d2d.kind 'distance' only, and d2d.kind is {s.d2d.kind!r}")
    if s.d2d.kind != "knn":
        yield from _ignored("d2d", s.d2d, ("k",), f"d2d.kind 'knn' only, and d2d.kind is {s.d2d.kind!r}")
    if s.d2d.kind == "none":
        yield from _ignored("d2d", s.d2d, ("bandwidth_hz",), "d2d.kind is 'none' (no sidelinks)")


def settings_warnings(scenario: Scenario) -> list[str]:
    """One message per field the scenario sets (to a non-default value) that has no effect
    with the rest of the scenario, naming the field, its value and why; empty if none.

    Examples: ``peft.rank`` under ``peft.method: prompt_tuning``, ``data.dirichlet_alpha`` with
    ``data.partition: iid``, ``data.path`` with ``data.dataset: bbc_news``, a ``fake:`` section
    with ``trainer: real``, ``lola:`` with another experiment, ``aircomp`` settings with
    ``channel.uplink_access: ofdma`` and experiment ``fedavg``."""
    out: dict[str, str] = {}  # field path -> its first message
    for rule in (_trainer_warnings, _peft_warnings, _data_warnings, _experiment_warnings, _lola_warnings,
                 _radio_warnings):
        for message in rule(scenario):
            out.setdefault(message.split("=", 1)[0], message)
    return list(out.values())
