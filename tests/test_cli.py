import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny

from layerfold import FoldPlan
from layerfold.cli.commands import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_tiny("llama").save_pretrained(path)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("layerfold: error: ") and message in last, err


def test_fold_prints_a_size_table_and_writes_a_loadable_model(capsys, tiny_dir, tmp_path):
    code, out, _ = run(
        capsys, "fold", tiny_dir, "--out", tmp_path / "f", "--strategy", "cycle", "--unique", "2", "--rank", "4"
    )
    assert code == 0
    assert "| unique parameters" in out and "| size on disk" in out
    code, out, _ = run(capsys, "info", tmp_path / "f", "--json")
    info = json.loads(out)
    assert code == 0 and info["unique_blocks"] == 2 and info["plan"]["operations"][0]["rank"] == 4
    assert info["bytes_on_disk"] == (tmp_path / "f" / "model.safetensors").stat().st_size


def test_fold_json_report(capsys, tiny_dir, tmp_path):
    code, out, _ = run(
        capsys,
        "fold",
        tiny_dir,
        "--out",
        tmp_path / "f",
        "--strategy",
        "sequence",
        "--unique",
        "2",
        "--rank",
        "attention=2,mlp=full",
        "--share",
        "attention",
        "--fit",
        "lower",
        "--json",
    )
    report = json.loads(out)
    assert code == 0
    tie = report["plan"]["operations"][0]
    assert tie["share"] == "attention" and tie["rank"] == {"attention": 2, "mlp": "full"} and tie["sources"] == [0]
    assert report["after"]["parameters"]["total"] < report["before"]["parameters"]["total"]
    assert report["after"]["bytes_on_disk"] < report["before"]["bytes_on_disk"]


def test_a_job_returns_a_typed_report_that_the_command_prints(capsys, tiny_dir, tmp_path):
    from layerfold.jobs.fold import FoldReport, fold_with_method
    from layerfold.jobs.info import checkpoint_info

    report = fold_with_method(tiny_dir, tmp_path / "f", keep_blocks=0.5, method="tie-cycle", progress=False)
    assert isinstance(report, FoldReport) and report.method == "tie-cycle" and report.keep_blocks <= 0.55
    # Read as a mapping too (the dicts of layerfold 0.1), with the very keys --json prints.
    assert report["budget"] == {"fraction": 0.5, "counts": "blocks"} and "streamed" not in report
    assert dict(report) == report.to_dict() == json.loads(report.to_json())
    assert report.markdown().startswith(f"Folded {tiny_dir}") and "Budget: 0.5 of the block" in report.markdown()
    info = checkpoint_info(tmp_path / "f")
    code, out, _ = run(capsys, "info", tmp_path / "f", "--json")
    assert code == 0 and json.loads(out) == info.to_dict()
    code, out, _ = run(capsys, "info", tmp_path / "f")
    assert out.strip() == info.markdown().strip()
    # A plan fold's report has no budget keys at all (not nulls).
    code, out, _ = run(capsys, "fold", tiny_dir, "--out", tmp_path / "g", "--strategy", "cycle", "--unique", "2", "--json")
    assert code == 0 and not {"budget", "keep", "method", "calibration"} & set(json.loads(out))


def test_fold_with_a_plan_file_then_export(capsys, tiny_dir, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    FoldPlan.from_groups([[0, 2]], drop=[3], num_layers=4, rank="full").save(plan_file)
    code, _, _ = run(capsys, "fold", tiny_dir, "--out", tmp_path / "f", "--plan", plan_file)
    assert code == 0
    code, out, _ = run(capsys, "export", tmp_path / "f", "--out", tmp_path / "plain")
    assert code == 0 and (tmp_path / "plain" / "config.json").is_file()
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "--strategy", "cycle", "--unique", "2"], "model path not found"),
        (["{model}", "--strategy", "cycle", "--unique", "9"], "unique: must be between 1 and the number of layers (4)"),
        (["{model}", "--strategy", "cycle", "--unique", "2", "--rank", "999"], "(tie).rank: rank 999 is larger than"),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--rank", "lots"],
            "--rank: must be a non-negative integer or 'full'",
        ),
        (["{model}", "--strategy", "cycle"], "--strategy cycle needs --unique K"),
        (["{model}"], "say how to fold"),
        (["{model}", "--plan", "{bad_plan}"], "plan.num_layers: the plan is for 6 layers but the model has 4"),
        (["{model}", "--plan", "{missing}"], "plan file not found"),
        (["{model}", "--plan", "{garbage}"], "plan: not valid YAML"),
        (["{model}", "--plan", "{bad_plan}", "--strategy", "cycle"], "give either --plan or --strategy"),
        (["{t5}", "--strategy", "cycle", "--unique", "1"], "unsupported architecture: model type 't5'"),
        (["{model}", "--strategy", "spiral", "--unique", "2"], "'spiral' is not one of"),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--fit", "lstsq"],
            "the plan's least-squares ties need calibration text (--calib PATH)",
        ),
        (["{model}", "--strategy", "cycle", "--unique", "2", "--fit", "median"], "'median' is not one of"),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--sequential", "--stream"],
            "--sequential does not go with --stream",
        ),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--rank", "2", "--relax", "kronecker", "--kron-factor",
             "5"],
            "5x5 Kronecker factors do not tile a",
        ),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--rank", "4", "--relax", "mos", "--mos-pool", "3"],
            "a mos pool of 3 vectors is too small for the 4 each position reads",
        ),
        (
            ["{model}", "--strategy", "cycle", "--unique", "2", "--rank", "4", "--relax", "mos", "--mos-shard", "3"],
            "mos shards of 3 vectors do not divide the rank 4",
        ),
        (
            ["{model}", "--plan", "{plain_plan}", "--calib", "{plain_plan}"],
            "the plan fits nothing to calibration data: leave out --calib",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(capsys, tiny_dir, tmp_path, args, message):
    import transformers as T

    T.T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    FoldPlan.cycle(6, 3).save(tmp_path / "six.yaml")
    FoldPlan.cycle(4, 2).save(tmp_path / "plain.yaml")
    (tmp_path / "garbage.yaml").write_text("num_layers: [1\n")
    values = dict(
        model=tiny_dir,
        missing=tmp_path / "missing",
        bad_plan=tmp_path / "six.yaml",
        garbage=tmp_path / "garbage.yaml",
        t5=tmp_path / "t5",
        plain_plan=tmp_path / "plain.yaml",
    )
    out = tmp_path / "out"
    code, _, err = run(capsys, "fold", *[a.format(**values) for a in args], "--out", out)
    assert_one_line_error(code, err, message)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "fold", tiny_dir, "--out", out, "--strategy", "cycle", "--unique", "2")
    assert_one_line_error(code, err, "output directory already exists")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "fold", tiny_dir, "--out", out, "--strategy", "cycle", "--unique", "2", "--overwrite")
    assert_one_line_error(code, err, "holds files layerfold did not write ('keep.txt')")
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert run(capsys, "fold", tiny_dir, "--out", ours, "--strategy", "cycle", "--unique", "2")[0] == 0
    code, _, _ = run(capsys, "fold", tiny_dir, "--out", ours, "--strategy", "cycle", "--unique", "3", "--overwrite")
    assert code == 0 and json.loads((ours / "config.json").read_text())["fold_plan"]["operations"][0]["layers"] == [0, 3]


def test_unwritable_output(capsys, tiny_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run(
        capsys, "fold", tiny_dir, "--out", tmp_path / "file" / "out", "--strategy", "cycle", "--unique", "2"
    )
    assert_one_line_error(code, err, "cannot write output directory")


def test_info_on_a_plain_model_says_it_loads_with_transformers_alone(capsys, tiny_dir, tmp_path):
    code, out, err = run(capsys, "info", tiny_dir)
    assert code == 0 and "transformers alone: a plain llama checkpoint" in out, err
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run(capsys, "info", tmp_path / "empty")[::2], "no config.json")


def test_console_script_exit_code_and_message(tiny_dir, tmp_path):
    script = Path(sys.executable).with_name("layerfold")
    result = subprocess.run(
        [
            str(script),
            "fold",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "o"),
            "--strategy",
            "cycle",
            "--unique",
            "2",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"layerfold: error: model path not found: {tmp_path / 'nothing'}"


def test_help_starts_without_torch_and_fold_help_lists_every_method_option():
    """The method registry (and torch) loads only for fold; fold --help shows each method's options."""
    import subprocess
    import sys

    # sys.argv[0] as the console script sets it: import layerfold skips registering with transformers there.
    script = "import sys; sys.argv[0] = 'layerfold'; from layerfold.cli.commands import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False", result.stderr
    result = subprocess.run(
        [sys.executable, "-c", "from layerfold.cli.commands import main; main(['fold', '--help'])"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    from layerfold.methods import registry

    for name in registry.all_options():
        assert "--" + name.replace("_", "-") in result.stdout, name
    assert all(method in result.stdout for method in registry.REGISTRY)


def test_version_prints_one_line_without_loading_torch():
    import subprocess
    import sys

    import layerfold

    script = (
        "import sys; sys.argv[0] = '/venv/bin/layerfold'; from layerfold.cli.commands import main; code = main(['--version']); "
        "print('torch' in sys.modules, code)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == [f"layerfold {layerfold.__version__}", "False 0"], result.stderr


def test_quiet_leaves_stdout_and_errors_only(capsys, tmp_path):
    build_tiny("llama").save_pretrained(tmp_path / "original")
    capsys.readouterr()  # transformers' own progress bar, before the command
    code, out, err = run(capsys, "--quiet", "fold", tmp_path / "original", "--out", tmp_path / "folded",
                         "--strategy", "cycle", "--unique", "2", "--json")  # fmt: skip
    assert code == 0 and err == "" and json.loads(out)["out"] == str(tmp_path / "folded")
    code, out, err = run(capsys, "-q", "fold", tmp_path / "original", "--out", tmp_path / "folded",
                         "--strategy", "cycle", "--unique", "2")  # fmt: skip
    assert_one_line_error(code, err, "exists")


@pytest.mark.parametrize(
    "flags, recorded",
    [
        (["--rank", "2", "--relax", "kronecker", "--kron-factor", "2", "--kron-terms", "3"],
         {"relax": "kronecker", "kron_factor": 2, "kron_terms": 3, "rank": 2}),
        (["--rank", "4", "--relax", "mos", "--mos-pool", "8", "--mos-shard", "2"],
         {"relax": "mos", "mos_pool": 8, "mos_shard": 2, "rank": 4}),
    ],
)  # fmt: skip
def test_fold_with_a_relaxation_form_records_its_settings_in_the_plan(capsys, tiny_dir, tmp_path, flags, recorded):
    code, out, _ = run(capsys, "fold", tiny_dir, "--out", tmp_path / "f", "--strategy", "cycle", "--unique", "2",
                       *flags, "--json")  # fmt: skip
    assert code == 0
    code, out, _ = run(capsys, "info", tmp_path / "f", "--json")
    tie = json.loads(out)["plan"]["operations"][0]
    assert {key: tie[key] for key in recorded} == recorded
