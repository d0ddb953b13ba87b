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


def _raise(exc: BaseException):
    def func(args):
        raise exc

    return func


@pytest.mark.parametrize(
    "exc, expected",
    [
        (
            OSError(28, "No space left on device", "/data/run/checkpoints"),
            "/data/run/checkpoints: No space left on device",
        ),
        (PermissionError(13, "Permission denied", "/ro/out"), "/ro/out: Permission denied"),
        (NotADirectoryError(20, "Not a directory", "/tmp/file/checkpoints"), "/tmp/file/checkpoints: Not a directory"),
        (IsADirectoryError(21, "Is a directory", "/tmp/out.csv"), "/tmp/out.csv: Is a directory"),
        (OSError(30, "Read-only file system"), "[Errno 30] Read-only file system"),
    ],
    ids=["enospc", "eacces", "enotdir", "eisdir", "erofs-without-path"],
)
def test_an_os_error_on_a_path_is_one_line_naming_it(exc, expected, monkeypatch, capsys):
    import clipforge.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["prep", "inspect", "x"])
    args.func = _raise(exc)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["prep", "inspect", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"clipforge prep: error: {expected} (--debug" in err, err


def test_an_unrelated_os_error_keeps_its_traceback(monkeypatch):
    import clipforge.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["prep", "inspect", "x"])
    args.func = _raise(ConnectionResetError(104, "Connection reset by peer"))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    with pytest.raises(ConnectionResetError):
        cli.main(["prep", "inspect", "x"])


def test_an_error_in_a_dataloader_worker_is_its_original_line(monkeypatch, capsys):
    """torch re-raises a worker's error with the worker's whole traceback as its text; the report is its last line."""
    from torch.utils.data import DataLoader, Dataset

    import clipforge.cli as cli

    class Broken(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise ValueError(f"images/{index}.jpg: cannot identify image file\nsecond line of the message")

    def evaluate(args):
        for _ in DataLoader(Broken(), num_workers=1):
            pass

    parser = cli.build_parser()
    args = parser.parse_args(["prep", "inspect", "x"])
    args.func = evaluate
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    assert cli.main(["prep", "inspect", "x"]) == 2
    assert capsys.readouterr().err == (
        "clipforge prep: error: images/0.jpg: cannot identify image file second line of the message "
        "(--debug or CLIPFORGE_DEBUG=1 shows the traceback)\n"
    )
