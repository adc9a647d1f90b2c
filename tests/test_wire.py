"""pgpubsub.wire: the NOTIFY payload format and ``Assembler``, which puts chunked messages back
together. The chunks below are written out as the format says (``~<msgid>:<seq>:<last>:<text>``)
so that a change of the format, which listeners of an older version would not read, fails here;
the last tests take chunks from the real ``pgpubsub_notify()``."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
from django.db import connection

from pgpubsub import wire
from pgpubsub.wire import Assembler
from tests.processes import wait_for
from tests.testapp import channels


def chunks(msgid: str, pieces: list[str]) -> list[str]:
    """The payloads of a message sent in ``pieces``, as pgpubsub_notify() writes them."""
    last = len(pieces) - 1
    return [f"~{msgid}:{seq}:{int(seq == last)}:{piece}" for seq, piece in enumerate(pieces)]


def warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "pgpubsub.wire"]


@pytest.mark.parametrize("payload", ['{"key": "k"}', "12345", wire.RECOVER, "not json ~:0:1:"])
def test_a_payload_that_is_no_chunk_passes_through(payload, caplog):
    assert Assembler().feed("pgpubsub_aaaaa", payload) == payload
    assert warnings(caplog) == []


def test_chunks_make_the_whole_message_with_the_last():
    assembler = Assembler()
    # ':' in the text is text: only the header's first three separate fields.
    first, second, last = chunks("m1", ['{"text": "a:b', ":c:", '"}'])
    assert assembler.feed("ch", first) is None
    assert assembler.feed("ch", second) is None
    assert assembler.feed("ch", last) == '{"text": "a:b:c:"}'


def test_a_message_of_one_chunk():
    assert Assembler().feed("ch", "~m1:0:1:whole") == "whole"


def test_chunks_of_messages_on_several_channels_reassemble_in_any_interleaving(caplog):
    # Two channels' messages, and the same msgid on both (each channel's is its own message).
    messages = {
        ("one", "m1"): ["a1", "a2", "a3"],
        ("two", "m2"): ["b1", "b2"],
        ("two", "m1"): ["c1", "c2"],
    }
    streams = [
        [(channel, payload) for payload in chunks(msgid, pieces)]
        for (channel, msgid), pieces in messages.items()
    ]
    expected = sorted((channel, "".join(pieces)) for (channel, _), pieces in messages.items())
    orders = 0
    for order in interleavings(streams):
        assembler = Assembler()
        whole = [(channel, assembler.feed(channel, payload)) for channel, payload in order]
        assert sorted(item for item in whole if item[1] is not None) == expected, order
        orders += 1
    assert orders == 210  # 7! / (3! 2! 2!)
    assert warnings(caplog) == []


def interleavings(streams: list[list]) -> list[list]:
    """Every merge of ``streams`` that keeps each stream's own order."""
    total = sum(len(stream) for stream in streams)
    merges = []
    labels = [index for index, stream in enumerate(streams) for _ in stream]
    for order in sorted(set(itertools.permutations(labels))):
        positions = [0] * len(streams)
        merged = []
        for index in order:
            merged.append(streams[index][positions[index]])
            positions[index] += 1
        merges.append(merged)
    assert all(len(merged) == total for merged in merges)
    return merges


def test_whole_messages_of_received_notifications_in_arrival_order():
    def notification(channel: str, payload: str) -> SimpleNamespace:
        return SimpleNamespace(channel=channel, payload=payload)

    big = chunks("m1", ["x" * 3, "y" * 3])
    received = [
        notification("one", big[0]),
        notification("two", "7"),
        notification("one", big[1]),
        notification("two", '{"k": 1}'),
    ]
    assert Assembler().whole_messages(received) == [
        ("two", "7"),
        ("one", "xxxyyy"),
        ("two", '{"k": 1}'),
    ]


def test_a_lost_chunk_drops_its_message_and_others_go_on(caplog):
    assembler = Assembler()
    lost = chunks("m1", ["a", "b", "c", "d"])
    kept = chunks("m2", ["e", "f"])
    assert assembler.feed("ch", lost[0]) is None
    assert assembler.feed("ch", kept[0]) is None
    # lost[1] never arrives
    assert assembler.feed("ch", lost[2]) is None
    assert assembler.feed("ch", lost[3]) is None
    assert assembler.feed("ch", kept[1]) == "ef"
    assert warnings(caplog) == [
        "Dropping chunked message m1 on channel ch: chunk 2 arrived after 1 chunks",
        "Dropping chunked message m1 on channel ch: chunk 3 arrived after 0 chunks",
    ]
    # The message id is free again: a message starting over under it is whole.
    assert [assembler.feed("ch", payload) for payload in chunks("m1", ["g", "h"])] == [None, "gh"]


def test_a_message_whose_first_chunks_were_missed_is_dropped(caplog):
    # A LISTEN that started in the middle of a message's chunks.
    assembler = Assembler()
    assert [assembler.feed("ch", payload) for payload in chunks("m1", ["a", "b", "c"])[1:]] == [
        None,
        None,
    ]
    assert len(warnings(caplog)) == 2


def test_an_incomplete_message_expires(caplog):
    assembler = Assembler(expiry=0.2)
    first, last = chunks("stale", ["a", "b"])
    assert assembler.feed("ch", first) is None
    # Expiry is checked as chunks arrive: other messages' chunks keep coming meanwhile, and
    # each of them completes in time.
    counter = itertools.count()

    def expired() -> bool:
        start, end = chunks(f"fresh{next(counter)}", ["c", "d"])
        assert assembler.feed("ch", start) is None
        assert assembler.feed("ch", end) == "cd"
        return "Dropping incomplete chunked message stale on channel ch" in warnings(caplog)

    wait_for(expired, 10, "the incomplete message to expire")
    assert assembler.feed("ch", last) is None  # its last chunk, too late
    assert warnings(caplog)[-1] == (
        "Dropping chunked message stale on channel ch: chunk 1 arrived after 0 chunks"
    )


def test_an_incomplete_message_is_kept_until_it_expires():
    assembler = Assembler()  # the default: a minute
    first, last = chunks("slow", ["a", "b"])
    assert assembler.feed("ch", first) is None
    for number in range(100):
        for payload in chunks(f"other{number}", ["c", "d"]):
            assembler.feed("ch", payload)
    assert assembler.feed("ch", last) == "ab"


@pytest.mark.parametrize(
    "payload",
    [
        "~",
        "~m1",
        "~m1:0",
        "~m1:0:1",  # no text separator
        "~m1:x:1:text",  # seq is no number
        "~m1::1:text",
    ],
)
def test_a_malformed_chunk_is_dropped_with_a_warning(payload, caplog):
    assembler = Assembler()
    assert assembler.feed("ch", payload) is None
    assert warnings(caplog) == [f"Dropping malformed chunk on channel ch: {payload!r}"]
    assert assembler.feed("ch", '{"next": 1}') == '{"next": 1}'


def test_a_malformed_chunk_does_not_disturb_a_message_in_progress(caplog):
    assembler = Assembler()
    first, last = chunks("m1", ["a", "b"])
    assert assembler.feed("ch", first) is None
    assert assembler.feed("ch", "~m1:zero:1:x") is None
    assert assembler.feed("ch", last) == "ab"
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("1", 1),
        ("9223372036854775807", wire.MAX_ROW_ID),
        ("9223372036854775808", None),  # beyond a bigint
        ("9" * 5000, None),
        ("", None),
        ("-1", None),
        (" 1", None),
        ("1.0", None),
        ("²", None),  # a digit to isdigit(), not to int()
        ("١", None),  # an Arabic-Indic one, which int() would take
        ('{"id": 1}', None),
    ],
)
def test_row_id(payload, expected):
    assert wire.row_id(payload) == expected


# --- chunks as the real pgpubsub_notify() writes them ----------------------------------------

CHUNK = re.compile(r"~(?P<msgid>[0-9a-f]+):(?P<seq>\d+):(?P<last>[01]):(?P<text>.*)", re.DOTALL)


def sent(listening, text: str) -> tuple[list[str], str]:
    """The payloads pgpubsub_notify() sends for ``text`` on a channel this test LISTENs to,
    and what an Assembler makes of them."""
    name = channels.Message.listen_safe_name()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pgpubsub_notify(%s, %s)", [name, text])
    assembler = Assembler()
    payloads: list[str] = []
    whole: list[str] = []

    def arrived() -> bool:
        listening.poll()
        for notification in listening.notifies:
            assert notification.channel == name
            payloads.append(notification.payload)
            message = assembler.feed(name, notification.payload)
            if message is not None:
                whole.append(message)
        listening.notifies[:] = []
        return bool(whole)

    wait_for(arrived, 10, "the message to arrive")
    assert len(whole) == 1
    return payloads, whole[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "text",
    [
        "x" * (wire.NOTIFY_LIMIT - 1),  # the longest message sent whole
        "x" * wire.NOTIFY_LIMIT,
        "ü€😀" * 3000,  # characters of 2, 3 and 4 bytes: chunks are cut between characters
        "😀" * 20_000,
        '{"text": "' + "a:b~" * 5000 + '"}',
    ],
    ids=["under-the-limit", "at-the-limit", "multibyte", "four-byte", "separators"],
)
def test_the_sql_functions_chunks_reassemble(listening, text):
    payloads, whole = sent(listening, text)
    assert whole == text
    if len(text.encode()) < wire.NOTIFY_LIMIT:
        assert payloads == [text]
        return
    parsed = [CHUNK.fullmatch(payload) for payload in payloads]
    assert all(parsed), payloads[:1]
    assert len({match["msgid"] for match in parsed}) == 1
    assert [int(match["seq"]) for match in parsed] == list(range(len(parsed)))
    assert [match["last"] for match in parsed] == [wire.MORE_CHUNKS] * (len(parsed) - 1) + [
        wire.LAST_CHUNK
    ]
    assert all(len(payload.encode()) < wire.NOTIFY_LIMIT for payload in payloads)
    assert all(len(match["text"].encode()) <= wire.CHUNK_BYTES for match in parsed)
