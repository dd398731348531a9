"""The audit chain's hashed form, and the ids events and requests carry."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from tokenward.audit.records import HASHED_FIELDS, canonical_row, iso, new_event_id
from tokenward.events import new_request_id

#: The reference encoding the chain is defined by (docs/audit.md).
_REFERENCE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
scalar = st.one_of(st.none(), text, st.integers(-(2**63), 2**63 - 1))
detail = st.one_of(
    st.dictionaries(text, st.one_of(st.none(), st.booleans(), text), max_size=5),
    # Not plain: floats, nesting, big integers take the reference encoder itself.
    st.dictionaries(
        text,
        st.one_of(st.floats(allow_nan=False), st.integers(), st.lists(st.integers(), max_size=3)),
        max_size=4,
    ),
)


@given(st.lists(scalar, min_size=len(HASHED_FIELDS) - 2, max_size=len(HASHED_FIELDS) - 2), detail)
def test_the_fast_encoding_is_byte_for_byte_the_reference(values, extra):
    at = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
    row = (values[0], at, *values[1:], extra)
    expected = list(row)
    expected[1] = iso(at)
    assert canonical_row(row, iso(at)) == _REFERENCE(expected).encode()


def test_iso_is_utc_with_microseconds_whatever_the_zone():
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2026, 11, 27, 14, 0, 0, tzinfo=plus_two)
    assert iso(moment) == "2026-11-27T12:00:00.000000Z"
    assert iso(moment.astimezone(UTC)) == "2026-11-27T12:00:00.000000Z"


def test_ids_are_unique_and_a_forked_child_draws_new_ones():
    ids = {new_event_id() for _ in range(1000)} | {new_request_id() for _ in range(1000)}
    assert len(ids) == 2000
    assert all(len(i) == 28 for i in ids if i.startswith("req_"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, f"{new_event_id()} {new_request_id()}".encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    mine = [new_event_id(), new_request_id()]
    assert child[0][:16] != mine[0][:16] and child[1][:20] != mine[1][:20]
