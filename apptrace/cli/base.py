"""What every command shares."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, TextIO


class CommandError(Exception):
    """A usage problem the CLI reports as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Command:
    """Base of the CLI commands: ``name`` is the words after ``apptrace``."""

    name = ""

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def print_json(obj: Any, out: Optional[TextIO] = None) -> None:
    """One compact JSON document and a newline, in a single write."""
    (out or sys.stdout).write(json.dumps(obj, separators=(",", ":")) + "\n")
