"""Plaintext TLS capture (``apptrace ssl``): what a process sends and receives
over TLS, byte-exact and per connection.

Hooks OpenSSL (shared ``libssl`` or linked into an executable, including the
``_ex`` forms and ``SSL_peek``), GnuTLS and NSS with uprobes; large calls
are copied in pieces so nothing is truncated, each connection direction
carries a running byte offset, and lost bytes become explicit :class:`Gap`
items::

    import apptrace.ssl

    with apptrace.ssl.capture(pid=1234, keep=True) as cap:
        for item in cap:                       # Chunk or Gap
            print(item.conn.five_tuple, item.direction, item.offset, item.data[:40])
        body = cap.stream(cap.connections[0], "read").data
"""

from apptrace.ssl.capture import Capture, capture
from apptrace.ssl.libraries import TlsLibrary
from apptrace.ssl.model import CaptureStats, Chunk, Connection, Gap, Stream, reassemble

__all__ = ["Capture", "CaptureStats", "Chunk", "Connection", "Gap", "Stream", "TlsLibrary",
           "capture", "reassemble"]
