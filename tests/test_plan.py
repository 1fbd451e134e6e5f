import pytest

from layerfold import FoldPlan, LayerfoldError
from layerfold.operations import Drop, Factor, Merge, Tie


def groups(plan):
    return [op.layers for op in plan.ties()]


def test_cycle_groups_layers_by_index_mod_k():
    plan = FoldPlan.cycle(6, 3)
    assert groups(plan) == [[0, 3], [1, 4], [2, 5]]
    assert plan.unique_blocks() == 3


def test_sequence_groups_consecutive_layers():
    assert groups(FoldPlan.sequence(6, 3)) == [[0, 1], [2, 3], [4, 5]]
    # Uneven split: longer runs first, one-layer runs stay unique.
    plan = FoldPlan.sequence(5, 3)
    assert groups(plan) == [[0, 1], [2, 3]]
    assert plan.unique_blocks() == 3


def test_middle_cycle_keeps_first_and_last_unique():
    plan = FoldPlan.middle_cycle(8, 4)
    assert groups(plan) == [[1, 3, 5], [2, 4, 6]]
    assert plan.unique_blocks() == 4


def test_identity_and_from_groups():
    assert FoldPlan.identity(4).unique_blocks() == 4
    plan = FoldPlan.from_groups([[2, 0]], drop=[3], num_layers=5, rank=4)
    assert plan.operations == [Tie(layers=[0, 2], rank=4), Drop(layers=[3])]
    assert plan.dropped() == [3] and plan.kept_layers() == [0, 1, 2, 4]
    assert plan.unique_blocks() == 3
    assert FoldPlan.from_groups([[0, 1]], drop=[3]).num_layers == 4


def test_init_sources_follow_relaxed_recursive_transformers():
    sources = lambda plan: [op.sources for op in plan.ties()]  # noqa: E731
    assert sources(FoldPlan.cycle(6, 3, fit="lower")) == [[0], [1], [2]]
    assert sources(FoldPlan.cycle(6, 3, fit="stepwise")) == [[0], [2], [4]]
    assert sources(FoldPlan.cycle(6, 3, fit="average")) == [[0, 3], [1, 4], [2, 5]]
    assert "fit=stepwise" in FoldPlan.cycle(6, 3, fit="stepwise").describe()
    assert FoldPlan.cycle(6, 3, init="lower") == FoldPlan.cycle(6, 3, fit="lower")  # fit's earlier name


def test_lstsq_fit_fits_every_layer_of_the_group_and_whitening_is_its_own_choice():
    plan = FoldPlan.cycle(6, 3, fit="lstsq", rank=2)
    assert [op.sources for op in plan.ties()] == [[0, 3], [1, 4], [2, 5]]
    assert all(op.fit == "lstsq" and not op.whiten for op in plan.ties())
    assert plan.whitens() and "fit=lstsq, rank=2" in plan.describe()
    assert not FoldPlan.cycle(6, 3, fit="average").whitens()
    plan.set_tie_options(fit="average")
    assert not plan.whitens() and all(op.fit == "mean" for op in plan.ties())
    plan.set_tie_options(whiten=True)
    assert plan.whitens() and "fit=average, rank=2, whitened relaxations" in plan.describe()


def test_rank_for_resolves_path_then_name_then_kind():
    tie = FoldPlan.cycle(4, 2, rank={"self_attn.q_proj": 3, "k_proj": 2, "mlp": "full"}).ties()[0]
    assert tie.rank_for("self_attn.q_proj", "attention") == 3
    assert tie.rank_for("self_attn.k_proj", "attention") == 2
    assert tie.rank_for("self_attn.v_proj", "attention") == 0
    assert tie.rank_for("mlp.up_proj", "mlp") == "full"


def test_operations_have_keys_by_kind_and_order():
    plan = FoldPlan(
        6,
        [
            Merge(into=0, layers=[1]),
            Tie(layers=[2, 4]),
            Factor(layers=[3], projection="mlp.up_proj", rank=2),
            Tie(layers=[0, 5], share="attention"),
            Factor(layers=[3], projection="mlp.down_proj", rank=2),
            Drop(layers=[1]),
        ],
    )
    plan.check()
    assert [key for key, _ in plan.keyed()] == ["merge_0", "tie_0", "factor_0", "tie_1", "factor_1", "drop_0"]
    assert plan.operation("factor_1").projection == "mlp.down_proj"


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_plan_round_trips_through_files(tmp_path, suffix):
    plan = FoldPlan.from_groups(
        [[0, 3], [1, 2]],
        drop=[4],
        num_layers=6,
        share="attention",
        fit="lower",
        rank={"attention": 4, "mlp": "full"},
        share_bias=True,
    )
    plan.operations.insert(0, Merge(into=5, layers=[4]))
    plan.operations.append(Factor(layers=[5], projection="mlp.up_proj", rank=3, whiten=False))
    plan.check()
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    assert FoldPlan.load(path) == plan
    assert FoldPlan.from_json(plan.to_json()) == plan
    assert FoldPlan.from_yaml(plan.to_yaml()) == plan
    assert "op: merge" in plan.to_yaml()


def test_a_plan_in_the_0_1_schema_converts_to_operations():
    old = {
        "num_layers": 6,
        "groups": [[3, 0], [1, 4], [2]],  # a one-layer group stays unique
        "drop": [5],
        "share": "mlp",
        "init": "lower",
        "rank": 2,
        "share_bias": True,
        "merges": [{"into": 2, "layers": [5]}],
        "factors": [{"layers": [2], "projection": "self_attn.q_proj", "rank": 4}],
        "whiten": False,
        "provenance": {"method": "x"},
    }
    plan = FoldPlan.from_dict(old)
    assert plan.operations == [
        Merge(into=2, layers=[5]),
        Tie(layers=[0, 3], share="mlp", sources=[0], rank=2, share_bias=True),
        Tie(layers=[1, 4], share="mlp", sources=[1], rank=2, share_bias=True),
        Factor(layers=[2], projection="self_attn.q_proj", rank=4, whiten=False),
        Drop(layers=[5]),
    ]
    assert plan.provenance == {"method": "x"} and FoldPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: FoldPlan.from_groups([[0, 9]], num_layers=4),
            r"plan.operations\[0\] \(tie\).layers: layer 9 is out of range for a 4-layer model",
        ),
        (
            lambda: FoldPlan.from_groups([[0, 1], [1, 2]], num_layers=4),
            r"plan.operations\[1\] \(tie\).layers: layer 1 is already tied by plan.operations\[0\]",
        ),
        (
            lambda: FoldPlan.from_groups([[0, 1]], drop=[1], num_layers=4),
            r"plan.operations\[0\] \(tie\).layers: layer 1 is also dropped by plan.operations\[1\]",
        ),
        (lambda: FoldPlan.from_groups([], drop=[0, 1, 2, 3], num_layers=4), r"plan: drops all 4 layers"),
        (lambda: FoldPlan.from_groups([], drop=[1, 1], num_layers=4), r"\(drop\).layers: layer 1 is listed twice"),
        (lambda: FoldPlan(4, [Drop([1]), Drop([1])]), r"operations\[1\] \(drop\).layers: layer 1 is already dropped"),
        (lambda: FoldPlan.cycle(4, 2, share="everything"), r"\(tie\).share: must be one of all, attention, mlp"),
        (lambda: FoldPlan.cycle(4, 2, fit="random"), r"plan.fit: must be one of average, stepwise, lower, lstsq"),
        (lambda: FoldPlan.cycle(4, 2, rank=-1), r"\(tie\).rank: must be 0, a positive integer or 'full'"),
        (lambda: FoldPlan.cycle(4, 2, rank={"mlp": "half"}), r"\(tie\).rank\['mlp'\]: must be 0"),
        (lambda: FoldPlan(num_layers=0), r"plan.num_layers: must be a positive integer"),
        (lambda: FoldPlan(4, [Tie(layers=[1])]), r"\(tie\).layers: must be a list of at least 2"),
        (
            lambda: FoldPlan(4, [Tie(layers=[0, 1]), Merge(into=0, layers=[3]), Drop([3])]),
            r"operations\[1\] \(merge\): merges must come before plan.operations\[0\]",
        ),
        (
            lambda: FoldPlan(4, [Factor([0], "mlp.up_proj", 2), Tie(layers=[0, 1])]),
            r"operations\[0\] \(factor\).layers: layer 0 is tied by plan.operations\[1\]",
        ),
        (lambda: FoldPlan(4, [Factor([0], "mlp.up_proj", 0)]), r"\(factor\).rank: must be a positive integer"),
    ],
)
def test_impossible_plans_are_rejected_naming_the_field(make, message):
    with pytest.raises(LayerfoldError, match=message):
        make().check()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FoldPlan.cycle(4, 5), "unique: must be between 1 and the number of layers"),
        (lambda: FoldPlan.middle_cycle(4, 2), "unique: must be between 3 and the number of layers"),
        (lambda: FoldPlan.from_dict({"num_layers": 4, "grops": []}), r"plan.grops: unknown field"),
        (lambda: FoldPlan.from_dict({"groups": []}), r"plan.num_layers: missing"),
        (lambda: FoldPlan.from_dict({"num_layers": 4, "operations": [{"op": "fold"}]}), r"unknown operation 'fold'"),
        (
            lambda: FoldPlan.from_dict({"num_layers": 4, "operations": [{"op": "tie", "layer": [0, 1]}]}),
            r"plan.operations\[0\].layer: unknown field of a tie operation",
        ),
        (
            lambda: FoldPlan.from_dict({"num_layers": 4, "operations": [{"op": "factor", "layers": [0]}]}),
            r"plan.operations\[0\]: a factor operation needs projection, rank",
        ),
        (lambda: FoldPlan.from_dict({"num_layers": 4, "operations": [3]}), r"must be a mapping with an op field"),
        (lambda: FoldPlan.from_dict([1, 2]), r"plan: expected a mapping"),
        (lambda: FoldPlan.from_yaml("num_layers: [1"), r"plan: not valid YAML"),
        (lambda: FoldPlan.from_json("{"), r"plan: not valid JSON"),
    ],
)
def test_bad_plan_input_is_rejected(make, message):
    with pytest.raises(LayerfoldError, match=message):
        make()
