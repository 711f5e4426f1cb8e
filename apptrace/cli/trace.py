"""``apptrace trace`` (see TraceCommand)."""
from apptrace.cli.base import Command


class TraceCommand(Command):
    """Trace probes (placeholder until the engine lands)."""

    name = "trace"

    def prepare_parser(self, parser):  # type: ignore[no-untyped-def]
        pass

    def run(self, args):  # type: ignore[no-untyped-def]
        return 2
