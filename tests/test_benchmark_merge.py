"""The one merge of benchmark result rows (benchmarks/common.py) that every script's --merge uses."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import merge_models, merge_rows  # noqa: E402


def key(row):
    return (row["budget"], row["row"])


def test_new_rows_replace_old_rows_by_key_and_the_rest_stay_in_place():
    old = [{"budget": 1.0, "row": "original", "x": 1}, {"budget": 0.5, "row": "svd", "x": 2, "healed": 9},
           {"budget": 0.5, "row": "lora", "x": 3}]
    new = [{"budget": 0.5, "row": "svd", "x": 20}, {"budget": 0.5, "row": "mos", "x": 4}]
    merged = merge_rows(old, new, key)
    assert [(r["row"], r["x"]) for r in merged] == [("original", 1), ("svd", 20), ("lora", 3), ("mos", 4)]
    assert "healed" not in merged[1]  # replaced: the old row's other columns go
    assert old[1]["x"] == 2  # the inputs are not changed


def test_update_keeps_the_old_columns_a_run_did_not_measure_and_stamp_marks_new_rows():
    old = [{"budget": 0.5, "row": "svd", "x": 2, "healed": 9, "measured": "2026-01-01"}]
    new = [{"budget": 0.5, "row": "svd", "x": 20}]
    merged = merge_rows(old, new, key, update=True, stamp=lambda row: {"measured": "2026-12-08"})
    assert merged == [{"budget": 0.5, "row": "svd", "x": 20, "healed": 9, "measured": "2026-12-08"}]


def test_merge_models_merges_per_model_and_keeps_models_not_run_again():
    old = [{"model": "a", "note": "old", "rows": [{"budget": 1.0, "row": "original", "x": 1}]},
           {"model": "b", "rows": [{"budget": 1.0, "row": "original", "x": 5}]}]
    new = [{"model": "a", "note": "new", "rows": [{"budget": 0.5, "row": "svd", "x": 2}]},
           {"model": "c", "rows": [{"budget": 1.0, "row": "original", "x": 7}]}]
    merged = {r["model"]: r for r in merge_models(old, new, key)}
    assert [r["row"] for r in merged["a"]["rows"]] == ["original", "svd"] and merged["a"]["note"] == "new"
    assert merged["b"]["rows"][0]["x"] == 5 and merged["c"]["rows"][0]["x"] == 7
