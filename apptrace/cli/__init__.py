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
import os
import signal
import sys
from typing import Optional, Sequence

from apptrace.cli.base import (
    Command,
    CommandError,
    SignalExit,
    install_signal_handlers,
    say,
)
from apptrace.cli.doctor import DoctorCommand
from apptrace.cli.jvm import JvmGcCommand
from apptrace.cli.semaphores import SemaphoresCommand
from apptrace.cli.trace import TraceCommand
from apptrace.cli.usdt import UsdtListCommand
from apptrace.errors import ApptraceError

__all__ = ["main", "Command", "CommandError"]

COMMANDS: list[type[Command]] = [UsdtListCommand, TraceCommand, DoctorCommand,
                                 SemaphoresCommand, JvmGcCommand]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apptrace",
        description="Trace running programs with eBPF: USDT probes, uprobes, stacks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}  # type: ignore[type-arg]
    for cls in COMMANDS:
        words = cls.name.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                     required=True)
            target = groups[words[0]]
        doc = (cls.__doc__ or "").strip()
        p = target.add_parser(words[-1], help=doc.splitlines()[0] if doc else None,
                              description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if command_argv is not None:
        if not getattr(args._command, "takes_command", False):
            parser.error(f"{args._command.name} does not run a command (remove --)")
        args.command_argv = command_argv
    restore = install_signal_handlers()
    try:
        return int(args._command.run(args) or 0)
    except CommandError as err:
        say(f"apptrace: {err}")
        return err.exit_code
    except ApptraceError as err:
        say(f"apptrace: error: {err}")
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


def _silence(stream: object) -> None:
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stream.fileno())  # type: ignore[attr-defined]
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
