"""The one command line (pipeline/cli.py): --help of every command, one-line user errors with exit
status 2 from every entry point, renamed keys, and a refused rerun through each stage's CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# A few keys each command's --help must show, with their defaults as the dataclass has them.
KNOWN = {"generate": {"temperatures": "[0.6]", "num_samples": "4", "overwrite": "false"},
         "curate": {"keep_correct_only": "false", "overwrite": "false"},
         "shrink": {"num_layers": "2", "method": "importance"},
         "sft": {"kd_alpha": "0.5", "learning_rate": "2e-05", "kd": "none", "output_dir": "null"},
         "onpolicy": {"teacher_server_top_k": "1", "lmbda": "1.0", "beta": "1.0"},
         "eval": {"num_samples": "4", "temperature": "0.6", "backend": "vllm"},
         "study": {"jobs": "1", "reduced": "false"},
         "gates": {"num_samples": "4", "distinct_samples": "8", "min_pass1": "0.95"},
         "teacher": {"hidden_size": "128", "kd_alpha": "0.5", "solution_column": "solution"},
         "demo": {"output_dir": "runs/demo", "quick": "false"},
         "tiny": {"arch": "qwen2", "hidden_size": "128", "num_layers": "2"}}


def test_the_command_list_names_every_command(capsys) -> None:
    cli.main(["--help"])
    text = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in text, command


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_lists_keys_with_their_defaults_project_keys_first(command: str, capsys) -> None:
    cli.main([command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    for key, default in KNOWN[command].items():
        line = next((line for line in lines if line.split()[:1] == [f"--{key}"]), None)
        assert line is not None and line.split()[1] == default, (key, line)
    headings = [line for line in lines if line.endswith("keys:") or line.endswith("):")]
    assert headings[0] == "r1-distill keys:", headings


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_user_errors_are_one_line_with_exit_status_two(command: str, tmp_path: Path, capsys) -> None:
    for argv, words in (([command, "--no_such_key", "1"], "unknown config key 'no_such_key'"),
                        ([command, "--config", str(tmp_path / "missing.yaml")], "missing.yaml does not exist")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err and err.count("\n") == 1, err


def test_renamed_keys_name_their_new_name(capsys) -> None:
    for argv, new in ((["onpolicy", "--traces", "x"], "'dataset'"), (["onpolicy", "--server_top_k", "5"],
                                                                      "'teacher_server_top_k'"),
                      (["demo", "--out", "x"], "'output_dir'"), (["tiny", "--hidden", "64"], "'hidden_size'")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"was renamed to {new}" in capsys.readouterr().err


# A stage config per stage (its shipped demo config, output_dir moved), and a key whose change is refused.
REFUSED = {"generate": ("configs/generate.yaml", "top_p", "0.9"), "shrink": ("configs/shrink.yaml", "num_layers", "3"),
           "sft": ("configs/sft.yaml", "learning_rate", "1e-5"), "onpolicy": ("configs/onpolicy.yaml", "beta", "0.5"),
           "eval": ("configs/eval.yaml", "top_p", "0.9")}


@pytest.mark.parametrize("stage", list(REFUSED))
def test_a_refused_rerun_is_one_line_with_exit_status_two(stage: str, tmp_path: Path, tiny_qwen: Path,
                                                          capsys) -> None:
    """A run that started (its record, and a checkpoint or shard) refuses a changed result key in
    its stage's own CLI, before loading any model."""
    import importlib

    from pipeline import rundir

    path, key, value = REFUSED[stage]
    module_name, class_name, _ = cli.COMMANDS[stage]
    module = importlib.import_module(module_name)
    overrides = {"output_dir": str(tmp_path / "out"),
                 **({"models": f"teacher={tiny_qwen}"} if stage == "eval" else {})}
    cfg = load_config(getattr(module, class_name), ROOT / path, overrides)
    rundir.open_run(cfg, stage, module.inputs(cfg), module.FREE_KEYS)
    (tmp_path / "out" / "shards").mkdir()  # it had made something
    with pytest.raises(SystemExit) as exit_:
        cli.main([stage, "--config", str(ROOT / path), *(f"--{k}={v}" for k, v in overrides.items()),
                  f"--{key}", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"{key}: " in err and "--overwrite" in err, err
