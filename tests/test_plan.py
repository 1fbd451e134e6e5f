import pytest

from layerfold import FoldPlan, LayerfoldError


def test_cycle_groups_layers_by_index_mod_k():
    plan = FoldPlan.cycle(6, 3)
    assert plan.groups == [[0, 3], [1, 4], [2, 5]]
    assert plan.unique_blocks() == 3


def test_sequence_groups_consecutive_layers():
    assert FoldPlan.sequence(6, 3).groups == [[0, 1], [2, 3], [4, 5]]
    # Uneven split: longer runs first, one-layer runs stay unique.
    plan = FoldPlan.sequence(5, 3)
    assert plan.groups == [[0, 1], [2, 3]]
    assert plan.unique_blocks() == 3


def test_middle_cycle_keeps_first_and_last_unique():
    plan = FoldPlan.middle_cycle(8, 4)
    assert plan.groups == [[1, 3, 5], [2, 4, 6]]
    assert plan.unique_blocks() == 4


def test_identity_and_from_groups():
    assert FoldPlan.identity(4).unique_blocks() == 4
    plan = FoldPlan.from_groups([[2, 0]], drop=[3], num_layers=5, rank=4)
    assert plan.groups == [[0, 2]] and plan.drop == [3] and plan.kept_layers() == [0, 1, 2, 4]
    assert plan.unique_blocks() == 3
    assert FoldPlan.from_groups([[0, 1]], drop=[3]).num_layers == 4


def test_init_sources_follow_relaxed_recursive_transformers():
    plan = FoldPlan.cycle(6, 3, init="lower")
    assert plan.init_sources() == {0: [0], 1: [1], 2: [2]}
    plan = FoldPlan.cycle(6, 3, init="stepwise")
    assert plan.init_sources() == {0: [0], 1: [2], 2: [4]}
    plan = FoldPlan.cycle(6, 3, init="average")
    assert plan.init_sources() == {0: [0, 3], 1: [1, 4], 2: [2, 5]}


def test_rank_for_resolves_path_then_name_then_kind():
    plan = FoldPlan.cycle(4, 2, rank={"self_attn.q_proj": 3, "k_proj": 2, "mlp": "full"})
    assert plan.rank_for("self_attn.q_proj", "attention") == 3
    assert plan.rank_for("self_attn.k_proj", "attention") == 2
    assert plan.rank_for("self_attn.v_proj", "attention") == 0
    assert plan.rank_for("mlp.up_proj", "mlp") == "full"


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_plan_round_trips_through_files(tmp_path, suffix):
    plan = FoldPlan.from_groups(
        [[0, 3], [1, 2]],
        drop=[4],
        num_layers=6,
        share="attention",
        init="lower",
        rank={"attention": 4, "mlp": "full"},
        share_bias=True,
    )
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    assert FoldPlan.load(path) == plan
    assert FoldPlan.from_json(plan.to_json()) == plan
    assert FoldPlan.from_yaml(plan.to_yaml()) == plan


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: FoldPlan.from_groups([[0, 9]], num_layers=4),
            r"plan.groups\[0\]: layer 9 is out of range for a 4-layer model",
        ),
        (
            lambda: FoldPlan.from_groups([[0, 1], [1, 2]], num_layers=4),
            r"plan.groups\[1\]: layer 1 is already in plan.groups\[0\]",
        ),
        (
            lambda: FoldPlan.from_groups([[0, 1]], drop=[1], num_layers=4),
            r"plan.groups\[0\]: layer 1 is also in plan.drop",
        ),
        (lambda: FoldPlan.from_groups([], drop=[0, 1, 2, 3], num_layers=4), r"plan.drop: drops all 4 layers"),
        (lambda: FoldPlan.from_groups([], drop=[1, 1], num_layers=4), r"plan.drop: layer 1 is listed twice"),
        (lambda: FoldPlan.cycle(4, 2, share="everything"), r"plan.share: must be one of all, attention, mlp"),
        (lambda: FoldPlan.cycle(4, 2, init="random"), r"plan.init: must be one of average, stepwise, lower"),
        (lambda: FoldPlan.cycle(4, 2, rank=-1), r"plan.rank: must be 0, a positive integer or 'full'"),
        (lambda: FoldPlan.cycle(4, 2, rank={"mlp": "half"}), r"plan.rank\['mlp'\]: must be 0"),
        (lambda: FoldPlan(num_layers=0), r"plan.num_layers: must be a positive integer"),
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
        (lambda: FoldPlan.from_dict([1, 2]), r"plan: expected a mapping"),
        (lambda: FoldPlan.from_yaml("num_layers: [1"), r"plan: not valid YAML"),
        (lambda: FoldPlan.from_json("{"), r"plan: not valid JSON"),
    ],
)
def test_bad_plan_input_is_rejected(make, message):
    with pytest.raises(LayerfoldError, match=message):
        make()
