"""The error hierarchy: fields, builtin bases, messages, pickling."""

from __future__ import annotations

import pickle

import pytest

from apptrace import errors as E


@pytest.mark.parametrize("err, builtin", [
    (E.ElfError("not an ELF file", path="/etc/passwd", note_index=3), ValueError),
    (E.NoProbesError("/bin/true"), LookupError),
    (E.ProbeNotFoundError("no such probe", probe="usdt:a:b", hint="list them"), LookupError),
    (E.ProcessGoneError(42), ProcessLookupError),
    (E.TracePermissionError("cannot load"), PermissionError),
    (E.SemaphoreConflictError("conflict", errno=22, probe="usdt:a:b"), OSError),
    (E.SymbolizerError("blazesym: not found", code=-2), RuntimeError),
])
def test_errors_pickle_with_their_type_fields_and_message(err, builtin):  # type: ignore[no-untyped-def]
    assert isinstance(err, E.ApptraceError) and isinstance(err, builtin)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err) and back.__dict__ == err.__dict__


def test_messages_name_the_file_the_note_and_the_fix() -> None:
    assert str(E.ElfError("descriptor too short", path="/x", note_index=2)) == \
        "/x, stapsdt note #2: descriptor too short"
    assert "sys/sdt.h" in str(E.NoProbesError("/bin/true"))
    assert "apptrace doctor" in str(E.TracePermissionError("cannot load"))
