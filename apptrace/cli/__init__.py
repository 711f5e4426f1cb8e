"""The ``apptrace`` command line: one class per command, ``main(argv) -> int``.

Only this package prints or exits. Library errors (:class:`ApptraceError`)
become one line on stderr and exit status 1; bad usage exits 2.

Every way apptrace ends except SIGKILL cleans up (detaches, lowers procmem
semaphores, stops a spawned command): SIGINT exits 130, SIGTERM and SIGHUP
128+N, a reader that closes the pipe (``apptrace ... | head``) 141, quietly.
After a SIGKILL, ``apptrace semaphores -p PID --reset`` lowers what the
killed tracer left raised.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from apptrace.cli.base import (
    Command,
    CommandError,
    SignalExit,
    install_signal_handlers,
    say,
)
from apptrace.errors import ApptraceError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "Command", "CommandError", "COMMANDS"]

# Every command: its words after `apptrace`, and where its class lives. Only
# the command being run is imported (all of them for `apptrace --help`), so
# `apptrace usdt list` does not pay for the tracing engine's imports. Add new
# commands here; COMMANDS gives the classes.
REGISTRY: list[tuple[str, str, str]] = [
    ("usdt list", "apptrace.cli.usdt", "UsdtListCommand"),
    ("trace", "apptrace.cli.trace", "TraceCommand"),
    ("latency", "apptrace.cli.latency", "LatencyCommand"),
    ("doctor", "apptrace.cli.doctor", "DoctorCommand"),
    ("semaphores", "apptrace.cli.semaphores", "SemaphoresCommand"),
    ("jvm gc", "apptrace.cli.jvm", "JvmGcCommand"),
    ("ssl", "apptrace.cli.ssl", "SslCommand"),
    ("prepare", "apptrace.cli.prepare", "PrepareCommand"),
]


def _load(module: str, name: str) -> type[Command]:
    cls: type[Command] = getattr(importlib.import_module(module), name)
    return cls


def __getattr__(name: str) -> Any:
    if name == "COMMANDS":  # every command class, in REGISTRY order
        return [_load(module, cls) for _words, module, cls in REGISTRY]
    raise AttributeError(f"module 'apptrace.cli' has no attribute {name!r}")


def _selected(argv: Sequence[str]) -> list[type[Command]]:
    """The command classes argv can mean: the one named, or all when it names none."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if words:
        chosen = [(m, c) for w, m, c in REGISTRY
                  if w == words[0] or w.split()[0] == words[0]]
        if len(words) == 2:
            chosen = [(m, c) for w, m, c in REGISTRY if w == " ".join(words)] or chosen
        if chosen:
            return [_load(m, c) for m, c in chosen]
    return [_load(m, c) for _w, m, c in REGISTRY]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized without importing shutil.

    argparse builds a formatter for every argument it adds and sizes it with
    shutil.get_terminal_size(); importing shutil (with bz2 and lzma) is a
    tenth of what `apptrace usdt list` costs. The width is only used when
    help is printed: COLUMNS, else the terminal's, else 80, as shutil does.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
        return 80


def build_parser(commands: Optional[Sequence[type[Command]]] = None) -> argparse.ArgumentParser:
    from apptrace import __version__

    parser = argparse.ArgumentParser(
        prog="apptrace", formatter_class=_HelpFormatter,
        description="Trace running programs with eBPF: USDT probes, uprobes, stacks.")
    parser.add_argument("--version", action="version", version=f"apptrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}  # type: ignore[type-arg]
    for cls in commands if commands is not None else __getattr__("COMMANDS"):
        words = cls.name.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=f"{words[0]} commands",
                                    formatter_class=_HelpFormatter)
                groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                     required=True)
            target = groups[words[0]]
        doc = (cls.__doc__ or "").strip()
        p = target.add_parser(words[-1], help=doc.splitlines()[0] if doc else None,
                              description=doc,
                              formatter_class=_HelpFormatter)
        cmd = cls()
        cmd.prepare_parser(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_argv: Optional[list[str]] = None
    if "--" in argv:
        # `apptrace trace PROBE... -- CMD ARGS`: everything after -- is the command.
        cut = argv.index("--")
        argv, command_argv = argv[:cut], argv[cut + 1:]
        if not command_argv:
            print("apptrace: nothing after --; give a command to run", file=sys.stderr)
            return 2
    parser = build_parser(_selected(argv))
    args = parser.parse_args(argv)
    if command_argv is not None:
        if not getattr(args._command, "takes_command", False):
            parser.error(f"{args._command.name} does not run a command (remove --)")
        args.command_argv = command_argv
    restore: "Callable[[], None]" = _nothing
    try:
        # Inside the try: a signal that lands while the handlers are being
        # installed ends the run like any other (exit 130 for SIGINT).
        restore = install_signal_handlers()
        return int(args._command.run(args) or 0)
    except CommandError as err:
        say(f"apptrace: {err}")
        return err.exit_code
    except ApptraceError as err:
        # One line; an expression error adds its text and a caret under the column.
        first, *more = str(err).split("\n")
        say(f"apptrace: error: {first}")
        for line in more:
            say(line)
        return 1
    except KeyboardInterrupt:
        return 130
    except SignalExit as err:
        return 128 + err.signum
    except BrokenPipeError:
        # The reader went away (`| head`): everything is cleaned up by now;
        # stdout goes nowhere so the interpreter's last flush cannot complain.
        _silence(sys.stdout)
        return 128 + signal.SIGPIPE
    except OSError as err:
        if os.environ.get("APPTRACE_DEBUG"):
            raise
        say(f"apptrace: error: {err}")
        return 1
    finally:
        restore()


def _nothing() -> None:
    """No handlers were installed: nothing to restore."""


def _silence(stream: object) -> None:
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stream.fileno())  # type: ignore[attr-defined]
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
