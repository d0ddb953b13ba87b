import subprocess
import sys

import pytest

from clipforge.cli import build_parser, main


@pytest.mark.parametrize("command", [["prep", "synthetic"], ["train"], ["eval"], ["export"], ["submit"]])
def test_every_subcommand_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) == 2:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    for action in sub._actions:
        assert action.help, f"{command} option {action.option_strings or action.dest} has no help"
    if command == ["train"]:
        assert "optim.lr" in text and "Peak learning rate" in text


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "clipforge", "--help"], capture_output=True, text=True, check=True)
    assert "prep" in out.stdout and "train" in out.stdout and "eval" in out.stdout


def test_bad_config_stops_before_any_work(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"data:\n  train_urls: x.tar\n  batchsize: 3\ntrain:\n  output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(config)]) == 2
    assert "data.batchsize" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_non_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--suite", "eval/synthetic.yaml"]) == 2
    assert "not a clipforge checkpoint" in capsys.readouterr().err
