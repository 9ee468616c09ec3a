"""Per-block PEFT control: ``peft.rank_per_layer`` (scenario validation, depth check, peft
rank_pattern on the real model)."""
import copy

import pytest
from pydantic import ValidationError

from deftsim.checks import check_rank_per_layer, check_scenario_resources
from netsim.scenario import PeftSpec, Scenario

HIDDEN = 384  # all-MiniLM-L6-v2
NUM_LABELS = 5


def test_rank_per_layer_forms():
    as_map = PeftSpec(rank_per_layer={5: 16, 3: 4, 0: 0})
    as_list = PeftSpec(rank_per_layer=[0, 0, 0, 4, 0, 16])
    assert as_map.layer_ranks() == as_list.layer_ranks() == {3: 4, 5: 16}
    assert as_map.trainable_layers() == [3, 5]
    assert PeftSpec.model_validate({"rank_per_layer": {"4": 2}}).layer_ranks() == {4: 2}  # YAML/--set keys
    assert PeftSpec(layers=[1, 2]).trainable_layers() == [1, 2]
    assert PeftSpec().trainable_layers() is None and PeftSpec().layer_ranks() is None
    PeftSpec(layers=[5, 3], rank_per_layer={3: 4, 5: 16})  # consistent: allowed


@pytest.mark.parametrize("bad, match", [
    ({"rank_per_layer": [0, 0, 0]}, "every rank is 0"),
    ({"rank_per_layer": {1: 2}, "layers": [2]}, "disagrees"),
    ({"rank_per_layer": {1: -1}}, "greater than or equal"),
    ({"rank_per_layer": {1: 2}, "method": "prompt_tuning"}, "LoRA only"),
])
def test_rank_per_layer_invalid(bad, match):
    with pytest.raises(ValidationError, match=match):
        PeftSpec.model_validate(bad)


def test_rank_per_layer_checked_against_model_depth():
    check_rank_per_layer({0: 4, 5: 8}, 6)
    check_rank_per_layer([0, 0, 0, 0, 4, 8], 6)
    with pytest.raises(ValueError, match=r"block\(s\) \[6\] do not exist.*0\.\.5"):
        check_rank_per_layer({6: 4}, 6)
    with pytest.raises(ValueError, match="5 entries but the model has 6 blocks"):
        check_rank_per_layer([0, 0, 0, 4, 8], 6)
    scenario = Scenario.model_validate({"name": "t", "trainer": "real", "peft": {"rank_per_layer": {7: 4}}})
    with pytest.raises(ValueError, match=r"peft.rank_per_layer.*\[7\] do not exist"):
        check_scenario_resources(scenario)


@pytest.fixture(scope="module")
def base_model():
    torch = pytest.importorskip("torch")
    from fomo.models import load_base
    from netsim.scenario import ModelSpec

    torch.manual_seed(0)
    return load_base(ModelSpec(), NUM_LABELS)[1]


def lora_counts(model):
    """{layer index: (#trainable LoRA parameters, scaling of its query module)}, head parameters."""
    from fomo.models import layer_index

    per_layer, head = {}, 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name:
            idx = layer_index(name.removeprefix("base_model.model."))
            per_layer[idx] = per_layer.get(idx, 0) + p.numel()
        else:
            head += p.numel()
    return per_layer, head


@pytest.mark.parametrize("ranks", [{5: 16, 4: 8}, [2, 0, 0, 4, 0, 32], {0: 1}])
def test_trainable_parameters_match_per_layer_ranks(base_model, ranks):
    from fomo.models import apply_peft

    spec = PeftSpec(rank=8, alpha=16, target_modules=["query", "value"], rank_per_layer=ranks)
    model = apply_peft(copy.deepcopy(base_model), spec)
    per_layer, head = lora_counts(model)
    expected = {i: 2 * 2 * r * HIDDEN for i, r in spec.layer_ranks().items()}  # (A + B) on query and value
    assert per_layer == expected
    assert head == HIDDEN * NUM_LABELS + NUM_LABELS  # the classification head is trained as well
    # every block keeps the scenario's scale alpha / rank
    scales = {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    assert scales and all(s == pytest.approx(16 / 8) for s in scales.values())
    # and its LoRA ranks are the requested ones
    for name, module in model.named_modules():
        if name.endswith(".value") and hasattr(module, "r") and module.r:
            from fomo.models import layer_index
            assert module.r["default"] == spec.layer_ranks()[layer_index(name.removeprefix("base_model.model."))]


def test_apply_peft_rejects_bad_rank_per_layer(base_model):
    from fomo.models import apply_peft

    with pytest.raises(ValueError, match="5 entries but the model has 6"):
        apply_peft(copy.deepcopy(base_model), PeftSpec(rank_per_layer=[0, 0, 0, 4, 8]))
    with pytest.raises(ValueError, match=r"\[9\] out of range"):
        apply_peft(copy.deepcopy(base_model), PeftSpec(rank_per_layer={9: 4}))


def test_rank_per_layer_with_all_linear(base_model):
    from fomo.models import apply_peft

    spec = PeftSpec(rank=4, target_modules=["all-linear"], rank_per_layer={5: 2})
    per_layer, _ = lora_counts(apply_peft(copy.deepcopy(base_model), spec))
    # query, key, value, attention.output.dense (d x d), intermediate (d -> 4d), output (4d -> d)
    d, f = HIDDEN, 1536
    assert per_layer == {5: 2 * (4 * (d + d) + (d + f) + (f + d))}
