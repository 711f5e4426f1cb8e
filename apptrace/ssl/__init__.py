"""Plaintext TLS capture (``apptrace ssl``): the next probe family, not built yet.

It will be a client of :class:`apptrace.session.Session` like every family:
uprobes/uretprobes on SSL_read/SSL_write (and their ``_ex`` forms), GnuTLS and
statically linked OpenSSL, with entry/return pairs and chunked payloads.
Nothing here is importable API yet.
"""

__all__: list[str] = []
