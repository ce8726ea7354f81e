"""Patch specs: which leaves each preset, combination or rule list labels as the task's patch.

Read as a specification of ``kfor1.patch.spec.partition`` and ``kfor1.patch.report.report``.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import TinyCNN

import kfor1
from kfor1.patch.report import report
from kfor1.patch.spec import PATCH, SHARED, PatchSpecError, partition, stats_labels
from kfor1.tree import flatten


class WithLayerNorm(nn.Module):
    """A BN model that also has a LayerNorm: scale and bias, but no batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.LayerNorm(name="ln")(x.mean((1, 2)))
        return nn.Dense(3, name="head")(x)


class NoDense(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, name="bn")(x).mean((1, 2))


def _init(model, size=16):
    return model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def patch_paths(labels) -> set[str]:
    return {p for p, label in flatten(labels).items() if label != SHARED}


def patch_size(params, labels) -> int:
    flat = flatten(params)
    return sum(int(np.size(flat[p])) for p in patch_paths(labels))


@pytest.fixture(scope="module")
def small():
    return _init(TinyCNN())


@pytest.fixture(scope="module")
def lite0():
    model = kfor1.create("efficientnet_lite0")
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


SMALL_BN = {f"{m}/{leaf}" for m in ("stem_bn", "dw_bn", "pw_bn") for leaf in ("scale", "bias")}
SMALL_HEAD = {"head/kernel", "head/bias"}
SMALL_ALL = SMALL_BN | SMALL_HEAD | {"stem/kernel", "dw/kernel", "pw/kernel", "pw/bias"}
SMALL_EXPECTED = {
    "scale_bias": SMALL_BN,
    "logits": SMALL_HEAD,
    "depthwise": {"dw/kernel"},
    "bias": {"stem_bn/bias", "dw_bn/bias", "pw_bn/bias", "pw/bias", "head/bias"},
    "full": SMALL_ALL,
    "none": set(),
    "scale_bias+logits": SMALL_BN | SMALL_HEAD,
    "depthwise+logits": {"dw/kernel"} | SMALL_HEAD,
}


# --- presets on a small CNN ------------------------------------------------------------------


def test_small_cnn_has_the_expected_leaves(small):
    assert set(flatten(small["params"])) == SMALL_ALL
    assert small["params"]["dw"]["kernel"].shape == (3, 3, 1, 8)


@pytest.mark.parametrize("spec", sorted(SMALL_EXPECTED))
def test_preset_labels_exactly_the_expected_leaves(small, spec):
    labels = partition(small, spec)
    assert set(flatten(labels)) == SMALL_ALL, "every parameter leaf gets a label"
    assert set(flatten(labels).values()) <= {SHARED, PATCH}
    assert patch_paths(labels) == SMALL_EXPECTED[spec]
    # The label tree has the same structure as the parameters.
    assert jax.tree.structure(labels) == jax.tree.structure(
        jax.tree.map(lambda _: "x", small["params"])
    )


def test_preset_from_params_and_batch_stats_keyword(small):
    """Passing params with ``batch_stats=`` is the same as passing the variables."""
    by_kw = partition(small["params"], "scale_bias+logits", batch_stats=small["batch_stats"])
    assert by_kw == partition(small, "scale_bias+logits")


def test_params_only_finds_batchnorm_by_its_leaves(small):
    """Without statistics, modules whose only leaves are 1-D scale and bias count as BN."""
    assert patch_paths(partition(small["params"], "scale_bias")) == SMALL_BN


def test_groups_named_by_the_most_specific_preset_whatever_the_order(small):
    """Issue 36: ``bias+logits`` put the head's bias in ``bias`` (lr 1e-2) and ``logits+bias``
    in ``logits`` (lr 1e-3). A spec is a set: a leaf two presets select goes to the most
    specific (``PRESETS`` order: logits, scale_bias, depthwise, bias, full)."""
    labels = flatten(partition(small, "scale_bias+bias", groups=True))
    for p in SMALL_BN:
        assert labels[p] == "scale_bias"
    assert labels["pw/bias"] == labels["head/bias"] == "bias"
    assert labels["head/kernel"] == labels["dw/kernel"] == SHARED
    assert flatten(partition(small, "bias+scale_bias", groups=True)) == labels

    for a, b in (("bias", "logits"), ("full", "logits"), ("depthwise", "full"),
                 ("scale_bias", "full"), ("bias", "scale_bias+logits")):
        one = flatten(partition(small, f"{a}+{b}", groups=True))
        assert one == flatten(partition(small, f"{b}+{a}", groups=True)), (a, b)
    assert flatten(partition(small, "bias+logits", groups=True))["head/bias"] == "logits"

    sb_logits = flatten(partition(small, "scale_bias+logits", groups=True))
    assert set(sb_logits.values()) == {"scale_bias", "logits", SHARED}
    assert {p for p, v in sb_logits.items() if v == "logits"} == SMALL_HEAD


def test_none_combined_with_another_preset_is_that_preset(small):
    assert partition(small, "none+logits") == partition(small, "logits")


def test_layernorm_is_not_scale_bias_when_variables_are_given():
    variables = _init(WithLayerNorm())
    assert set(variables["params"]["ln"]) == {"scale", "bias"}
    labels = partition(variables, "scale_bias")
    assert patch_paths(labels) == {"bn/scale", "bn/bias"}
    # Params alone cannot tell them apart: LayerNorm looks like BN then.
    assert patch_paths(partition(variables["params"], "scale_bias")) == {
        "bn/scale", "bn/bias", "ln/scale", "ln/bias",
    }


def test_head_override_by_name():
    variables = _init(WithLayerNorm())
    assert patch_paths(partition(variables, "logits")) == {"head/kernel", "head/bias"}
    # Any module can be named the head, e.g. the LayerNorm (paths with or without slashes).
    assert patch_paths(partition(variables, "logits", head="ln")) == {"ln/scale", "ln/bias"}
    assert patch_paths(partition(variables, "logits", head="/ln/")) == {"ln/scale", "ln/bias"}


def test_stats_labels_follow_patched_batchnorm(small):
    labels = partition(small, [("stem_bn/.*", "patch"), (".*", "shared")])
    stat_labels = flatten(stats_labels(small["batch_stats"], labels))
    assert stat_labels == {
        "stem_bn/mean": PATCH, "stem_bn/var": PATCH,
        "dw_bn/mean": SHARED, "dw_bn/var": SHARED,
        "pw_bn/mean": SHARED, "pw_bn/var": SHARED,
    }


# --- presets on EfficientNet-Lite0 -----------------------------------------------------------


def _sizes(variables, labels) -> int:
    return patch_size(variables["params"], labels)


def test_lite0_parameter_count(lite0):
    assert sum(int(np.size(x)) for x in jax.tree.leaves(lite0["params"])) == 4_652_008


def test_lite0_scale_bias(lite0):
    bn_channels = sum(
        int(np.size(v)) for p, v in flatten(lite0["batch_stats"]).items() if p.endswith("/mean")
    )
    assert bn_channels == 21_008
    labels = partition(lite0, "scale_bias")
    assert _sizes(lite0, labels) == 2 * bn_channels == 42_016
    bn_modules = {p.rsplit("/", 1)[0] for p in flatten(lite0["batch_stats"])}
    assert patch_paths(labels) == {f"{m}/{leaf}" for m in bn_modules for leaf in ("scale", "bias")}


def test_lite0_logits(lite0):
    labels = partition(lite0, "logits")
    assert patch_paths(labels) == {"head/logits/kernel", "head/logits/bias"}
    assert _sizes(lite0, labels) == 1280 * 1000 + 1000


def test_lite0_depthwise(lite0):
    labels = partition(lite0, "depthwise")
    assert patch_paths(labels) == {f"blocks_{i}/depthwise/conv/kernel" for i in range(16)}


def test_lite0_full_and_none(lite0):
    assert _sizes(lite0, partition(lite0, "full")) == 4_652_008
    assert set(flatten(partition(lite0, "full")).values()) == {PATCH}
    assert _sizes(lite0, partition(lite0, "none")) == 0
    assert set(flatten(partition(lite0, "none")).values()) == {SHARED}


def test_lite0_combination_is_the_union(lite0):
    combined = partition(lite0, "scale_bias+logits")
    assert patch_paths(combined) == (
        patch_paths(partition(lite0, "scale_bias")) | patch_paths(partition(lite0, "logits"))
    )
    assert _sizes(lite0, combined) == 42_016 + 1_281_000
    grouped = flatten(partition(lite0, "scale_bias+logits", groups=True))
    assert sum(v == "logits" for v in grouped.values()) == 2
    assert sum(v == "scale_bias" for v in grouped.values()) == 2 * len(
        {p.rsplit("/", 1)[0] for p in flatten(lite0["batch_stats"])}
    )


def test_lite0_head_named_explicitly(lite0):
    labels = partition(lite0, "logits", head="head/logits")
    assert labels == partition(lite0, "logits")


# --- rules -----------------------------------------------------------------------------------


def test_rules_first_match_wins(small):
    labels = flatten(partition(small, [
        ("head/bias", "shared"),        # takes head/bias before the next rule
        ("head/.*", "patch"),
        (".*_bn/.*", "patch"),
        (".*", "shared"),
    ]))
    assert {p for p, v in labels.items() if v == PATCH} == SMALL_BN | {"head/kernel"}
    assert labels["head/bias"] == SHARED


def test_rules_use_fullmatch(small):
    # 'stem' alone would match 'stem/kernel' with re.match/search, but not with fullmatch.
    with pytest.raises(PatchSpecError, match="matches no parameter"):
        partition(small, [("stem", "patch"), (".*", "shared")])
    labels = partition(small, [("stem.*", "patch"), (".*", "shared")])
    assert patch_paths(labels) == {"stem/kernel", "stem_bn/scale", "stem_bn/bias"}


def test_rule_groups(small):
    rules = [
        (".*_bn/(scale|bias)", "patch:bn"),
        ("head/.*", "patch:head"),
        ("dw/kernel", "patch"),
        (".*", "shared"),
    ]
    grouped = flatten(partition(small, rules, groups=True))
    assert {p for p, v in grouped.items() if v == "bn"} == SMALL_BN
    assert {p for p, v in grouped.items() if v == "head"} == SMALL_HEAD
    assert grouped["dw/kernel"] == PATCH
    assert set(grouped.values()) == {"bn", "head", PATCH, SHARED}
    # Without groups every patch label is plain 'patch'.
    plain = flatten(partition(small, rules))
    assert set(plain.values()) == {PATCH, SHARED}
    assert {p for p, v in plain.items() if v == PATCH} == SMALL_BN | SMALL_HEAD | {"dw/kernel"}


# --- errors ----------------------------------------------------------------------------------


def test_unknown_preset(small):
    with pytest.raises(PatchSpecError, match="unknown patch preset 'scale_bais'") as info:
        partition(small, "scale_bais+logits")
    assert isinstance(info.value, ValueError)
    assert "scale_bias" in str(info.value)  # lists the valid presets
    with pytest.raises(ValueError, match="unknown patch preset"):
        partition(small, "")


def test_malformed_regex(small):
    with pytest.raises(PatchSpecError, match="malformed regex"):
        partition(small, [("head/(kernel", "patch"), (".*", "shared")])


def test_uncovered_leaves_suggest_a_catch_all(small):
    with pytest.raises(PatchSpecError, match="catch-all") as info:
        partition(small, [("head/.*", "patch")])
    assert "match no rule" in str(info.value)


def test_rule_matching_nothing(small):
    with pytest.raises(PatchSpecError, match="'classifier/.\\*' matches no parameter"):
        partition(small, [("classifier/.*", "patch"), (".*", "shared")])
    # Also when an earlier rule took all of its leaves.
    with pytest.raises(PatchSpecError, match="matches no parameter"):
        partition(small, [(".*", "shared"), ("head/.*", "patch")])


def test_rule_matching_nothing_names_this_models_paths(small):
    # The hint shows the model's own paths nearest the rule, not kfor1's naming.
    with pytest.raises(PatchSpecError) as info:
        partition(small, [("stem_bm/scale", "patch"), (".*", "shared")])
    assert "this model's paths look like 'stem_bn/scale'" in str(info.value)
    with pytest.raises(PatchSpecError) as info:
        partition(small, [("zzzzzzzz", "patch"), (".*", "shared")])
    first = next(iter(flatten(small.get("params", small))))
    assert f"look like {first!r}" in str(info.value)


@pytest.mark.parametrize("label", ["trainable", "patch:", "patch:a-b", "Shared", "patch:shared"])
def test_bad_label(small, label):
    # 'patch:shared' would name the group 'shared' with groups=True: silently frozen.
    with pytest.raises(PatchSpecError, match="label must be 'shared', 'patch' or"):
        partition(small, [("head/.*", label), (".*", "shared")], groups=True)


def test_bad_spec_type(small):
    with pytest.raises(PatchSpecError, match="preset string"):
        partition(small, 42)
    with pytest.raises(PatchSpecError, match="empty list"):
        partition(small, [])


def test_head_that_is_not_a_module(lite0):
    with pytest.raises(PatchSpecError, match="'head/classifier' is not a module") as info:
        partition(lite0, "logits", head="head/classifier")
    assert "head/logits" in str(info.value)  # lists the Dense layers
    with pytest.raises(PatchSpecError, match="is not a module"):
        partition(lite0, "logits", head="head")  # a parent scope, not the Dense module


def test_model_without_dense_has_no_logits():
    variables = _init(NoDense())
    with pytest.raises(PatchSpecError, match="no Dense layer"):
        partition(variables, "scale_bias+logits")
    # Other presets work.
    assert patch_paths(partition(variables, "scale_bias")) == {"bn/scale", "bn/bias"}


# --- report ----------------------------------------------------------------------------------


def test_report_counts_per_group(small):
    labels = partition(small, "scale_bias+logits", groups=True)
    rep = report(small, labels)
    groups = {g.label: g for g in rep.groups}
    assert list(groups) == ["logits", "scale_bias", SHARED]  # patch groups first, shared last
    bn = 2 * (8 + 8 + 16)
    head = 16 * 5 + 5
    total = 3 * 3 * 3 * 8 + 3 * 3 * 1 * 8 + 8 * 16 + 16 + bn + head
    assert groups["scale_bias"].parameters == bn and groups["scale_bias"].leaves == 6
    assert groups["logits"].parameters == head and groups["logits"].leaves == 2
    assert groups[SHARED].parameters == total - bn - head and groups[SHARED].leaves == 4
    for g in rep.groups:
        assert g.bytes == 4 * g.parameters  # float32
    assert rep.total_parameters == total
    assert rep.patch_parameters == bn + head
    assert rep.patch_bytes == 4 * (bn + head)
    assert rep.patch_stat_parameters == bn  # mean and var of each patched BN channel
    assert rep.patch_fraction == pytest.approx((bn + head) / total)
    for k in (0, 1, 10, 100):
        assert rep.cost_of_tasks(k) == pytest.approx(1 - rep.patch_fraction
                                                     + k * rep.patch_fraction)


def test_report_ungrouped_matches_grouped_totals(small):
    grouped = report(small, partition(small, "scale_bias+logits", groups=True))
    plain = report(small, partition(small, "scale_bias+logits"))
    assert [g.label for g in plain.groups] == [PATCH, SHARED]
    assert plain.patch_parameters == grouped.patch_parameters
    assert plain.total_parameters == grouped.total_parameters
    assert plain.patch_stat_parameters == grouped.patch_stat_parameters


def test_report_to_dict_is_json(small):
    rep = report(small, partition(small, "scale_bias+logits", groups=True))
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["patch_parameters"] == rep.patch_parameters
    assert data["patch_fraction"] == pytest.approx(rep.patch_fraction)
    assert [g["label"] for g in data["groups"]] == [g.label for g in rep.groups]
    assert {"label", "leaves", "parameters", "bytes"} <= set(data["groups"][0])


def test_report_str_has_the_table(small):
    rep = report(small, partition(small, "scale_bias+logits", groups=True))
    text = str(rep)
    lines = text.splitlines()
    for column in ("group", "leaves", "parameters", "% of model", "bytes"):
        assert column in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    for g in rep.groups:
        row = next(line for line in lines if line.split()[0] == g.label)
        assert f"{g.parameters:,}" in row
        assert f"{100 * g.parameters / rep.total_parameters:.2f}" in row
    assert any(line.startswith("total") for line in lines)
    p = rep.patch_fraction
    assert f"K tasks cost {1 - p:.4f} + K x {p:.4f} models" in text


def test_a_full_patch_costs_k_models_not_k_plus_one(lite0):
    rep = report(lite0, partition(lite0, "full"))
    assert rep.cost_of_tasks(10) == pytest.approx(10)
    assert "(K=10: 10.00 instead of 10)" in str(rep)


def test_report_lite0(lite0):
    rep = report(lite0, partition(lite0, "scale_bias+logits"))
    assert rep.total_parameters == 4_652_008
    assert rep.patch_parameters == 42_016 + 1_281_000
    assert rep.patch_stat_parameters == 42_016
    assert rep.cost_of_tasks(10) == pytest.approx(1 + 9 * 1_323_016 / 4_652_008)
    sb = report(lite0, partition(lite0, "scale_bias"))
    assert sb.patch_fraction < 0.01  # the paper's point: ~1% of the model per task
