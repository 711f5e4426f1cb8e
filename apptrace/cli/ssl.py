"""``apptrace ssl``: the plaintext a process sends and receives over TLS."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from apptrace.cli.base import Command, CommandError, say


class SslCommand(Command):
    """Capture TLS plaintext (OpenSSL, GnuTLS, NSS) of a process, byte-exact, per connection.

    Target: -p PID, --path FILE (every process using FILE: a libssl, or a
    program with OpenSSL linked in; including processes started later) or
    -- CMD ARGS... (started here and held until every probe is attached).

    Formats: text (a header line per TLS call, then its bytes with
    non-printables escaped), hex, jsonl (one JSON object per record, data in
    data_b64; bytes the capture does not have appear as records with "gap"),
    pcapng (TCP/IP with the connection's real addresses, for Wireshark; needs
    -o FILE or a pipe). Nothing is truncated: a large call comes as several
    records with increasing offsets. Output files are created mode 0600.

    Examples:
      apptrace ssl -p PID -d 3
      apptrace ssl -- curl -sk https://127.0.0.1:8443/
      apptrace ssl --format jsonl -o tls.jsonl -p PID -d 3
      apptrace ssl --format pcapng -o tls.pcapng -- python3 client.py
    """

    name = "ssl"
    takes_command = True

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        tgt = parser.add_argument_group("target (exactly one)")
        tgt.add_argument("-p", "--pid", type=int, help="capture this running process")
        tgt.add_argument("--path", metavar="FILE",
                         help="capture every process using FILE (system-wide)")
        parser.add_argument("-f", "--format", choices=("text", "hex", "jsonl", "pcapng"),
                            default="text", help="output format (default: text)")
        parser.add_argument("--json", action="store_true", help="same as --format jsonl")
        parser.add_argument("-o", "--output", metavar="FILE",
                            help="write here (created mode 0600) instead of stdout")
        parser.add_argument("-d", "--duration", type=float, metavar="SECONDS",
                            help="stop after this long")
        parser.add_argument("--max-bytes", type=int, metavar="N",
                            help="copy at most N bytes of each TLS call (the rest is shown"
                                 " as a gap); default: everything")
        parser.add_argument("--ring-mb", type=int, default=32, metavar="MB",
                            help="kernel ring buffer size (default 32); raise it when the"
                                 " summary reports lost bytes")
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="no attach message and no summary")

    def run(self, args: argparse.Namespace) -> int:
        from apptrace.output import open_output, open_private
        from apptrace.ssl import Capture
        from apptrace.ssl.formats import make_writer

        command = getattr(args, "command_argv", None)
        given = sum(x is not None for x in (args.pid, args.path, command))
        if given != 1:
            raise CommandError("ssl: give exactly one target: -p PID, --path FILE or -- CMD")
        fmt = "jsonl" if args.json else args.format
        if args.max_bytes is not None and args.max_bytes < 1:
            raise CommandError("ssl: --max-bytes must be at least 1")
        if args.duration is not None and args.duration <= 0:
            raise CommandError("ssl: -d must be a positive number of seconds")
        if not 1 <= args.ring_mb <= 4096:
            raise CommandError("ssl: --ring-mb must be from 1 to 4096")
        if fmt == "pcapng" and args.output is None and sys.stdout.isatty():
            raise CommandError("ssl: pcapng is binary: give -o FILE or pipe the output")

        out: Any = None
        raw: Any = None
        cap: Optional[Capture] = None
        writer: Any = None
        try:
            if fmt == "pcapng":
                fd = open_private(args.output) if args.output else os.dup(sys.stdout.fileno())
                raw = os.fdopen(fd, "wb")
            elif args.output is not None:
                out = open_output(args.output)
            else:
                out = sys.stdout
            to_stdout = args.output is None
            cap = Capture(pid=args.pid, path=args.path, command=command,
                          ring_mb=args.ring_mb, max_bytes=args.max_bytes,
                          command_stdout=2 if command and to_stdout else None)
            cap.start()
            if not args.quiet:
                for lib in cap.libraries:
                    say(f"apptrace: {lib.describe()}")
                if cap.not_found:
                    say(f"apptrace: not found in {'this process' if args.pid else 'the target'}:"
                        f" {', '.join(cap.not_found)}")
                for w in cap.warnings:
                    say(f"apptrace: warning: {w}")
                say(f"apptrace: capturing TLS of {cap.target.describe()} (attached in"
                    f" {cap.attach_seconds:.2f}s); Ctrl-C to stop")
            writer = make_writer(fmt, raw if raw is not None else out, cap.wall_offset_ns)
            interrupted = False
            try:
                for batch in cap.batches(args.duration):
                    for item in batch:
                        writer.write(item)
                    writer.flush()  # stream: `apptrace ssl ... | head` sees calls now
            except KeyboardInterrupt:
                interrupted = True
                cap.ended = "interrupted"
            writer.flush()
            stats = cap.stats()
        finally:
            if cap is not None:
                cap.close()
            if writer is not None:
                try:
                    writer.close()
                except (OSError, ValueError):
                    pass
            if raw is not None and not raw.closed:
                raw.close()
            if out is not None and out is not sys.stdout:
                out.close()
        if not args.quiet:
            _summary(cap, stats, interrupted)
        return 130 if interrupted else 0


def _summary(cap: Any, st: Any, interrupted: bool) -> None:
    why = cap.ended or ("interrupted" if interrupted else "stopped")
    parts = [f"{st.calls} TLS call{_s(st.calls)}", f"{st.bytes} bytes",
             f"{st.connections} connection{_s(st.connections)}"]
    lost = []
    if st.lost_records:
        lost.append(f"{st.lost_bytes} bytes in {st.lost_records} records lost (ring buffer"
                    " full: raise --ring-mb)")
    if st.unreadable_bytes:
        lost.append(f"{st.unreadable_bytes} bytes unreadable (buffer not in memory)")
    if st.skipped_bytes:
        lost.append(f"{st.skipped_bytes} bytes beyond --max-bytes not copied")
    if st.lost_meta:
        lost.append(f"{st.lost_meta} connection records lost")
    if st.malformed:
        lost.append(f"{st.malformed} records unreadable by the decoder")
    say(f"apptrace: {why}: " + ", ".join(parts) + "; "
        + ("; ".join(lost) if lost else "0 lost"))
    status = cap.exit_status
    if status is not None and status < 0:
        import signal

        say(f"apptrace: command ended by {signal.Signals(-status).name}")
    elif status is not None:
        say(f"apptrace: command exited with status {status}")


def _s(n: int) -> str:
    return "" if n == 1 else "s"
