"""The command line every entry point shares: `UserError`, `run_main`, and the `--key=value` parser
generated from a config dataclass (`--help` included).

Every field of a config dataclass is a flag; its default and the comment beside it are its `--help`.
Errors a user can cause raise `UserError`, which `run_main` turns into one line and exit code 2; library
code never exits the process itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input (flags, files, prompts): reported in one line, exit code 2."""


class CommandFailed(Exception):
    """A command that ends early for a reason of its own (a diverging run): one line, exit `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class ShowHelp(Exception):
    """`--help`: run_main prints the text and exits 0."""


def parse_command(cls: type, argv: Sequence[str], defaults: object, prog: str,
                  extra: str = "") -> tuple[object, set[str]]:
    """An entry point's flags: `--help` (or -h) shows every field of `cls` with its default, else
    parse_flags."""
    if "--help" in argv or "-h" in argv:
        raise ShowHelp(format_help(cls, prog, defaults, extra))
    return parse_flags(cls, argv, defaults)


def run_main(main: Callable[[list[str]], int | None], prog: str) -> None:
    """Run an entry point: a UserError, or an OSError from the environment (permissions, a full disk,
    a bad path), becomes one line on stderr and exit code 2; a closed stdout ends the run quietly."""
    try:
        code = main(sys.argv[1:])
    except ShowHelp as e:
        print(e)
        sys.exit(0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CommandFailed as e:
        if str(e):  # other processes of a torchrun job leave the saying to rank 0
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except BrokenPipeError:  # e.g. `python -m fastgpt.sample | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}: check the path, its permissions and the free "
              f"disk space", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def make_log(enabled: bool = True) -> Callable[..., None]:
    """print() for progress lines, off when `enabled` is false (other ranks of a torchrun job); a
    reader that goes away (`| head`, a `| tee` killed by Ctrl-C) silences it instead of stopping
    the run."""
    state = {"open": enabled}

    def log(*args, **kwargs) -> None:
        if not state["open"]:
            return
        try:
            print(*args, **kwargs, flush=True)
        except BrokenPipeError:
            state["open"] = False
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    return log


# names users bring from other trainers, for the "did you mean" of an unknown flag
HINTS = {"lr": "learning_rate", "iters": "max_iters", "steps": "max_iters", "batch": "batch_size",
         "layers": "n_layer", "heads": "n_head", "embd": "n_embd", "context": "block_size", "ckpt": "checkpoint"}


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source: its help text."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _is_bool(hint: object) -> bool:
    """True for `bool` and `bool | None` fields: flags that may stand alone or as --no-NAME."""
    return hint is bool or set(typing.get_args(hint)) == {bool, type(None)}


def _convert(name: str, text: str, hint: object) -> object:
    """Parse a flag's text as the field's type."""
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        if text.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} takes true or false, got {text!r}")
    try:
        value = hint(text)
    except ValueError:
        raise UserError(f"--{name} takes {'an integer' if hint is int else 'a number'}, got {text!r}") from None
    if hint is int and not -2**63 <= value < 2**63:
        raise UserError(f"--{name}={text} is out of range")
    return value


def format_help(cls: type, prog: str, defaults: object, extra: str = "") -> str:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines = [f"usage: python -m {prog} [--key=value ...]", ""]
    if extra:
        lines += [extra, ""]
    for f in dataclasses.fields(cls):
        flag = f"--[no-]{f.name}" if _is_bool(hints[f.name]) else f"--{f.name}"
        lines.append(f"  {flag:<32} {comments.get(f.name, '')} (default: {getattr(defaults, f.name)!r})")
    return "\n".join(lines)


def parse_flags(cls: type, argv: Sequence[str], defaults: object) -> tuple[object, set[str]]:
    """Parse `--key=value` / `--key value` / `--flag` / `--no-flag` into a copy of `defaults`.

    Returns the config and the set of field names given on the command line.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --key=value")
        key, eq, text = arg[2:].partition("=")
        name = key.replace("-", "_")
        if not eq and name.startswith("no_") and _is_bool(hints.get(name[3:])):
            values[name[3:]] = False
            continue
        if name not in hints:
            close = [HINTS[name]] if HINTS.get(name) in hints else difflib.get_close_matches(name, hints, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown flag --{key}{hint}; see --help for the list")
        if not eq:
            if _is_bool(hints[name]):
                values[name] = True
                continue
            if not args or args[0].startswith("--"):
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            text = args.pop(0)
        values[name] = _convert(name, text, hints[name])
    return dataclasses.replace(defaults, **values), set(values)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag read at step boundaries; a second signal aborts at once."""

    def __init__(self, log):
        self.signum: int | None = None
        self.log = log
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                 f"(signal again to abort without saving)")
