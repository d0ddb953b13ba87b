"""``clipforge prep|train|eval|export|submit|plan|wise-ft``: thin wrappers, one entry function each.

clipforge prep synthetic --out data/synth --num-samples 20000
clipforge prep table captions.csv --out data/mine --image-column filepath --caption-column title
clipforge prep hf path/to/saved_dataset --out data/mine        (or a folder of images: --imagefolder)
clipforge prep inspect data/mine
clipforge prep score data/mine --model runs/demo/checkpoints/latest --out data/mine-scores  (then filter, reshard)
clipforge train configs/demo.yaml --set optim.lr=5e-4 --set data.batch_size=256
clipforge eval runs/demo/checkpoints/latest --suite eval/synthetic.yaml
clipforge eval runs/demo/checkpoints/latest --dataset data/synth/eval/shapes --predictions shapes.csv
clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo [--push org/name]
clipforge export runs/vit/checkpoints/latest --towers text --out exported/vit-text-encoder
clipforge submit configs/vit-b-32.yaml --nodes 16 --gpus-per-node 8 --partition gpu --time 48:00:00
clipforge plan configs/vit-b-16.yaml --gpus 64 --gpu h100        (memory, time and traffic per GPU; no GPU needed)
clipforge wise-ft INITIAL runs/ft/checkpoints/latest --target eval/t.yaml --retention eval/r.yaml --out runs/wise
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable

# Each command's parser and entry function live in its own module (submit's in clipforge.launch); this one builds
# the parser and turns a user's mistake into one line.
from clipforge.cli import evaluate, export, plan, prep, train, wise_ft


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose description can end in text made only when its help is shown (``more_help``):
    ``train --help`` lists every config key, which imports every config module; other commands need none of it."""

    def __init__(self, *args, more_help: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.more_help = more_help

    def format_help(self) -> str:
        if self.more_help is not None:
            self.description, self.more_help = (self.description or "") + self.more_help(), None
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep.add_parser(commands)
    train.add_parser(commands)
    evaluate.add_parser(commands)
    export.add_parser(commands)
    plan.add_parser(commands)
    wise_ft.add_parser(commands)
    from clipforge.launch import add_parser as add_submit

    add_submit(commands)
    _add_debug_flag(parser)
    parser.set_defaults(debug=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] in (["eval"], ["train"]):
        # Training and evaluation decode in DataLoader workers beside torch's CPU threads. OpenMP threads that
        # spin while they wait take the cores those workers need: with the cores shared, the image tower ran
        # ~5x slower (2 cores); passive waiting costs nothing measurable on an idle machine or on a GPU run.
        # OpenMP reads it when torch loads, so it is set first (an explicit OMP_WAIT_POLICY wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)  # first: --help and usage errors exit here, before torch is imported
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays at WARNING
    try:
        return args.func(args)
    except Exception as exc:
        if not _is_user_error(exc) or args.debug or os.environ.get("CLIPFORGE_DEBUG", "") not in ("", "0"):
            raise
        message = _one_line(exc)
        kind = (
            ""
            if type(exc).__module__ == "builtins" or type(exc).__name__ == "ConfigError"
            else f"{type(exc).__name__}: "
        )  # what stopped a run: DataError, CorruptCheckpoint, NonFiniteError, ...
        print(
            f"clipforge {args.command}: error: {kind}{message} (--debug or CLIPFORGE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


_USER_ERRORS = (
    ("clipforge.config", "ConfigError"),
    ("clipforge.data.samples", "DataError"),
    ("clipforge.checkpoints", "CorruptCheckpoint"),
    ("clipforge.train.health", "CollapseError"),
    ("clipforge.train.loop", "NonFiniteError"),
)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user's input causes (a config, a path, bad data, a damaged checkpoint, a run that diverged): reported
    as one line. Anything else is a bug in clipforge or a library and keeps its traceback.

    Only the modules already imported are asked: an error class whose module was never imported cannot have been
    raised, and importing them (torch, the whole trainer) would make a one-line message take seconds."""
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return *loaded, FileNotFoundError, ValueError


def _is_user_error(exc: BaseException) -> bool:
    """A user's input or environment: the listed kinds, and an OS error on a path (a full disk, a read-only or
    unwritable folder, a file where a folder belongs) from anywhere."""
    if isinstance(exc, _user_errors()):
        return True
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _FILESYSTEM_ERRNOS)


_FILESYSTEM_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ENOTEMPTY,
}


def _one_line(exc: BaseException) -> str:
    """The error as one line. An error raised in a DataLoader worker arrives with the worker's whole traceback as its
    text (torch's ``ExceptionWrapper``): its original last line is the message. An OS error on a path says which."""
    text = str(exc)
    marker = "Original Traceback (most recent call last):\n"
    if marker in text:
        frames = text.split(marker, 1)[1].splitlines()
        first = next((i for i, line in enumerate(frames) if line and not line.startswith(" ")), None)
        if first is not None:
            original = "\n".join(frames[first:])
            name, sep, rest = original.partition(": ")
            text = rest if sep and name.split(".")[-1] == type(exc).__name__ else original
    elif isinstance(exc, OSError) and exc.filename is not None:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        text = f"{exc.filename}{target}: {exc.strerror or text}"
    return " ".join(text.split())


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command, so it can go anywhere on the command line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the whole traceback of an error (as CLIPFORGE_DEBUG=1 does)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _add_debug_flag(sub)
