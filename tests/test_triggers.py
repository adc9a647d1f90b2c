"""Trigger channels: the payload built in SQL reaches listeners as faithful model instances."""

import datetime
import decimal
import select
import time
import uuid

import pytest
from django.db import transaction
from django.test import override_settings

import pgpubsub
from pgpubsub.channel import BaseChannel
from pgpubsub.exceptions import InvalidPayload
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Author, Child, Document, Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)


def deliveries(kind):
    return [kwargs for name, kwargs in received if name == kind]


def test_insert_update_delete_reach_listeners_with_old_and_new(listening):
    post = Post.objects.create(content="draft")
    post.content = "final"
    post.save()
    post_id = post.pk
    post.delete()
    process_notifications(listening)

    saves = deliveries("PostTrigger")
    assert [(d["old"] and d["old"].content, d["new"].content) for d in saves] == [
        (None, "draft"),
        ("draft", "final"),
    ]
    assert all(isinstance(d["new"], Post) and d["new"].pk == post_id for d in saves)
    assert saves[0]["new"]._state.adding  # unsaved instances, as in django-pgpubsub
    (deleted,) = deliveries("PostTrigger.delete")
    assert deleted["new"] is None
    assert deleted["old"].pk == post_id and deleted["old"].content == "final"


def test_every_column_type_round_trips_through_the_trigger_payload(listening):
    moment = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc)
    token = uuid.uuid4()
    doc = Document.objects.create(
        title="types",
        body="ü€ 'quoted' \\ $$",
        price=decimal.Decimal("12345678901234.123456"),
        ratio=0.1,
        published=datetime.date(1999, 12, 31),
        updated=moment,
        duration=datetime.timedelta(days=3, hours=4, microseconds=5),
        token=token,
        data={"nested": [1, 2.5, None, "x"], "flag": True},
        blob=b"\x00\x01binary\xff",
        tags=["a", "b c", "ü"],
        renamed="column name differs",
    )
    process_notifications(listening)
    (delivery,) = deliveries("DocumentTrigger")
    new = delivery["new"]
    assert delivery["old"] is None
    assert new.pk == doc.pk
    assert new.title == "types"
    assert new.body == "ü€ 'quoted' \\ $$"
    assert new.price == decimal.Decimal("12345678901234.123456")
    assert new.ratio == 0.1
    assert new.published == datetime.date(1999, 12, 31)
    assert new.updated == moment
    assert new.duration == datetime.timedelta(days=3, hours=4, microseconds=5)
    assert new.token == token
    assert new.data == {"nested": [1, 2.5, None, "x"], "flag": True}
    assert bytes(new.blob) == b"\x00\x01binary\xff"
    assert new.tags == ["a", "b c", "ü"]
    assert new.renamed == "column name differs"


def test_before_delete_listener_does_not_cancel_the_delete(listening):
    doc = Document.objects.create(title="doomed")
    doc_id = doc.pk
    doc.delete()
    assert not Document.objects.filter(pk=doc_id).exists()
    process_notifications(listening)
    (delivery,) = deliveries("DocumentDeleting")
    assert delivery["old"].title == "doomed" and delivery["new"] is None


def test_multi_table_inheritance_child_row(listening):
    child = Child.objects.create(label="parent part", toy="ball")
    process_notifications(listening)
    (delivery,) = deliveries("ChildTrigger")
    assert delivery["new"].pk == child.pk
    assert delivery["new"].id == child.pk
    assert delivery["new"].toy == "ball"


def heard_until(raw, marker: str, timeout: float = 10.0) -> list[str]:
    """The payloads this session received, up to and including ``marker`` (within ``timeout``)."""
    payloads: list[str] = []
    deadline = time.monotonic() + timeout
    while marker not in payloads and time.monotonic() < deadline:
        if hasattr(raw, "pgconn"):  # psycopg 3
            notes = list(raw.notifies(timeout=0.1, stop_after=1))
        else:
            select.select([raw], [], [], 0.1)
            raw.poll()
            notes = list(raw.notifies)
            raw.notifies.clear()
        payloads += [note.payload for note in notes]
    assert marker in payloads, f"the marker NOTIFY, heard {payloads}"
    return payloads


def test_lockable_trigger_stores_the_whole_message_and_sends_only_its_id(write_mode):
    """The trigger stores the whole message; a NOTIFY from the writer's transaction carries
    only the row's id, and only when the channel notifies on write (by default the writer
    sends none: the watcher wakes the listeners)."""
    from django.db import connection

    name = channels.AuthorTrigger.listen_safe_name()
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {name}")
    try:
        author = Author.objects.create(name="Ann", age=41)
        (row,) = Notification.from_channel(channels.AuthorTrigger)
        assert row.payload["app"] == "testapp" and row.payload["model"] == "Author"
        assert row.payload["old"] is None
        assert row.payload["new"] == {"id": author.pk, "name": "Ann", "age": 41, "active": True}
        assert row.payload["context"] == {}
        assert row.created_at is not None
        assert row.db_version is not None  # latest migration id of the payload's app
        # A NOTIFY committed after the insert: whatever the insert sent arrives before it.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, 'marker')", [name])
        heard = heard_until(connection.connection, "marker")
        if write_mode == "notify on write":
            assert heard == [str(row.pk), "marker"]
        else:
            assert heard == ["marker"]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("UNLISTEN *")


def test_lockable_trigger_processed_once_and_row_removed(listening):
    Author.objects.create(name="Bo")
    process_notifications(listening)
    process_notifications(listening)
    assert Effect.objects.filter(channel="AuthorTrigger").count() == 1
    assert Post.objects.filter(content="first post of Bo").count() == 1
    assert Notification.objects.count() == 0


@pytest.mark.parametrize("unit", ["a", "ü€😀"])
def test_one_megabyte_rows_arrive_intact_plain_and_lockable(listening, unit):
    body = (unit * (1_000_000 // len(unit.encode())))[: 1_000_000 // len(unit.encode())]
    doc = Document.objects.create(title="big", body=body)
    process_notifications(listening)
    (plain,) = deliveries("DocumentTrigger")
    assert plain["new"].body == body
    (locked,) = deliveries("LockedDocumentTrigger")
    assert locked["new"].body == body
    assert Effect.objects.get(key=f"document-{doc.pk}").value == str(len(body))


@override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True)
def test_session_notification_context_reaches_listeners(listening):
    from django.db import connection

    pgpubsub.set_notification_context({"request_id": "r-1", "user": "ann"})
    try:
        Post.objects.create(content="with context")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET pgpubsub.notification_context")
    Post.objects.create(content="without context")
    process_notifications(listening)
    contexts = [d["context"] for d in deliveries("PostTrigger")]
    assert contexts == [{"request_id": "r-1", "user": "ann"}, {}]


def test_context_is_not_passed_unless_enabled(listening):
    pgpubsub.set_notification_context({"request_id": "r-2"})
    Post.objects.create(content="x")
    process_notifications(listening)
    (delivery,) = deliveries("PostTrigger")
    assert "context" not in delivery


@override_settings(
    PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True, PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT=True
)
def test_transaction_bound_context(listening):
    with pytest.raises(RuntimeError, match="atomic"):
        pgpubsub.set_notification_context({"a": 1})
    with transaction.atomic():
        pgpubsub.set_notification_context({"tx": 1})
        Post.objects.create(content="in tx")
    Post.objects.create(content="after tx")
    process_notifications(listening)
    assert [d["context"] for d in deliveries("PostTrigger")] == [{"tx": 1}, {}]


@override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True)
def test_context_set_in_a_transaction_on_a_pooled_alias_ends_with_it(listening):
    """Through transaction pooling the server connection passes to other clients between
    transactions: a context set inside one must not outlive it (it appeared in another
    process's payloads)."""
    from django.conf import settings

    pooled = {"DISABLE_SERVER_SIDE_CURSORS": True}
    databases = {**settings.DATABASES, "default": {**settings.DATABASES["default"], **pooled}}
    with override_settings(DATABASES=databases), transaction.atomic():
        pgpubsub.set_notification_context({"request_id": "r-3"})
        Post.objects.create(content="in tx")
    Post.objects.create(content="after tx")
    process_notifications(listening)
    assert [d["context"] for d in deliveries("PostTrigger")] == [{"request_id": "r-3"}, {}]


def test_context_is_ignored_in_an_aborted_transaction(django_db_setup):
    from django.db import DatabaseError, connection

    with transaction.atomic():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")
        except DatabaseError:
            pass
        connection.needs_rollback = True
        pgpubsub.set_notification_context({"ignored": True})  # must not raise


def test_context_is_ignored_when_postgres_has_aborted_the_transaction(django_db_setup):
    """Django does not know yet (no atomic block has exited): Postgres refuses the statement."""
    from django.db import DatabaseError, connection

    with pytest.raises(DatabaseError), transaction.atomic():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")
        except DatabaseError:
            pass
        assert not connection.needs_rollback
        pgpubsub.set_notification_context({"ignored": True})  # must not raise
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")  # the transaction is still aborted, as before


def test_before_and_after_listeners_of_one_channel_each_run_once(listening):
    post = Post.objects.create(content="timed")
    post.delete()
    process_notifications(listening)

    names = [name for name, _ in received if name.startswith("PostTimings")]
    assert names == ["PostTimings.before", "PostTimings.after", "PostTimings.delete"]
    assert all(
        kwargs["new"] is None or kwargs["new"].content == "timed"
        for name, kwargs in received
        if name.startswith("PostTimings")
    )


def test_messages_without_timing_reach_every_listener_of_their_operation():
    """Rows stored by earlier versions carry no "when": both timings' listeners get them."""
    payload = {
        "app": "testapp",
        "model": "Post",
        "old": None,
        "new": {
            "id": 7,
            "content": "old format",
            "author_id": None,
            "date": "2024-01-01T00:00:00+00:00",
            "read_count": 0,
        },
        "context": {},
    }
    callbacks = BaseChannel.get(channels.PostTimings.listen_safe_name())[1]
    channels.PostTimings.build_from_payload(payload, callbacks).execute_callbacks()
    assert [name for name, _ in received] == ["PostTimings.before", "PostTimings.after"]


@pytest.mark.parametrize(
    "context, problem",
    [({"ratio": float("nan")}, "not valid JSON"), ({"note": "a\x00b"}, "NUL")],
    ids=["nan", "nul"],
)
def test_a_context_jsonb_would_refuse_is_refused_at_once(django_db_setup, context, problem):
    with pytest.raises(InvalidPayload, match=problem):
        pgpubsub.set_notification_context(context)
    Author.objects.create(name="still writable")  # the session's later trigger writes work


def test_insert_and_update_decorators_each_get_their_own_rows(listening):
    author = Author.objects.create(name="Ann")
    author.name = "Anna"
    author.save()
    author.save()  # an update that does not rename
    process_notifications(listening)

    events = [
        (name, kwargs["old"] and kwargs["old"].name, kwargs["new"].name)
        for name, kwargs in received
        if name.startswith("Author")
    ]
    # Triggers of one timing fire in the order of their names (pgpubsub_0105c first).
    assert events == [
        ("AuthorEvents.pre_insert", None, "Ann"),
        ("AuthorEvents.pre_update", "Ann", "Anna"),
        ("AuthorRenamed", "Ann", "Anna"),  # its own trigger's condition: renames only
        ("AuthorEvents.post_update", "Ann", "Anna"),
        ("AuthorEvents.pre_update", "Anna", "Anna"),
        ("AuthorEvents.post_update", "Anna", "Anna"),
    ]
