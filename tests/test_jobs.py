"""The jobs, one per command: their settings dataclasses generate the command line (every option, every default
stated once, in the dataclass), and ``import layerfold`` exports them by their command names."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import build_tiny, save_tiny_with_tokenizer

import layerfold
from layerfold.cli import generate
from layerfold.core.settings import options_of
from layerfold.cli.commands import COMMANDS, RUNNERS, _named, load_command, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_settings_field_is_an_option_whose_default_the_dataclass_states(name):
    load_command(name)
    command = COMMANDS[name]
    parameters = RUNNERS[name].__signature__.parameters
    for flag in options_of(_named(command.settings), command.changes):
        assert flag.name in parameters, f"{name}: {flag.name} has no option"
        default = flag.field.default
        typer_default = parameters[flag.name].default.default
        # typer never holds a default of its own: an option not given keeps the dataclass's (plain flags: False)
        assert typer_default in (None, ..., False), (name, flag.name, typer_default)
        if default not in (None, False, dataclasses.MISSING, 0) and not flag.meta.get("required"):
            shown = parameters[flag.name].default.help
            assert "[default:" in shown, (name, flag.name, shown)


def test_one_calibration_default_for_every_command_that_calibrates():
    defaults = set()
    for name in ("fold", "analyze", "plan", "compress"):
        for flag in options_of(_named(COMMANDS[name].settings)):
            if flag.name == "calib_tokens":
                defaults.add(flag.field.default)
    assert len(defaults) == 1


def test_the_command_line_gives_the_settings_and_defaults_stay_the_dataclasses(tmp_path):
    from layerfold.heal.settings import HealConfig
    from layerfold.jobs.heal import HealSettings

    load_command("heal")
    values = {p: None for p in RUNNERS["heal"].__signature__.parameters}
    values.update(model=tmp_path, teacher=tmp_path, data=[tmp_path], out=tmp_path / "o", steps=7, loss="kl=1,lm=0.5",
                  hidden_layers="-1,-2", unit_memory="1GB", json=False, overwrite=False, stream=False, resume=False,
                  keep_checkpoints=False)  # fmt: skip
    settings = generate.settings_from(HealSettings, values, COMMANDS["heal"].changes)
    assert settings.config.steps == 7 and settings.config.hidden_layers == [-1, -2]
    assert settings.config.unit_memory == 10**9 and settings.config.loss.active() == {"kl": 1.0, "lm": 0.5}
    assert settings.config.lr == HealConfig().lr and settings.output.out == tmp_path / "o"


def test_the_jobs_are_exported_by_their_command_names(tmp_path):
    from layerfold.jobs.fold import FoldReport
    from layerfold.jobs.info import InfoReport

    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source)
    by_plan = layerfold.fold(source, layerfold.FoldPlan.cycle(4, 2, rank=2), out=tmp_path / "tied")
    assert isinstance(by_plan, FoldReport) and "2 unique blocks" in by_plan.plan_summary
    by_method = layerfold.fold(source, method="drop-even", keep_blocks=0.5, out=tmp_path / "dropped")
    assert by_method.method == "drop-even" and by_method.keep_blocks == pytest.approx(0.5, abs=0.01)
    info = layerfold.info(tmp_path / "tied")
    assert isinstance(info, InfoReport) and info.needs_layerfold
    model = layerfold.fold(build_tiny("llama"), layerfold.FoldPlan.cycle(4, 2))  # a loaded model: in place
    assert layerfold.unique_parameters(model) < layerfold.unique_parameters(build_tiny("llama"))
    assert callable(layerfold.heal) and layerfold.heal.HealConfig is not None  # the package is the job too
    for name in ("analyze", "plan", "compress", "evaluate", "export"):
        assert callable(getattr(layerfold, name)), name
    with pytest.raises(layerfold.LayerfoldError, match="unknown setting 'keeep'"):
        layerfold.fold(source, method="svd", keeep=0.5, out=tmp_path / "x")


def test_moved_modules_still_import_with_a_deprecation_warning():
    script = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n    import layerfold.io\nexcept DeprecationWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore')\n"
        "import layerfold.io, layerfold.checkpoints.folded as new\n"
        "from layerfold.adapters import lora_config\n"
        "print(layerfold.io is new)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines() == ["layerfold.io is now layerfold.checkpoints.folded", "True"], result.stderr


def test_eval_settings_list_the_registered_tasks(capsys):
    from layerfold.evaluation.tasks import TASKS

    code = main(["eval", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and all(name in out for name in TASKS)


def test_analyze_needs_its_data(capsys, tmp_path):
    save_tiny_with_tokenizer(tmp_path)
    code = main(["analyze", str(tmp_path / "llama"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code != 0 and "--data" in err and "Traceback" not in err
