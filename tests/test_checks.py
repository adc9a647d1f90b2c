"""System checks: what `manage.py check` (and `check --database`) tells a user about pgpubsub."""

import dataclasses
import io
import os
import subprocess
import sys

import pgtrigger
import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings

import pgpubsub
from pgpubsub.channel import _by_listen_name, _trigger_operations, registry
from pgpubsub.triggers import Notify
from tests.processes import MANAGE, ROOT
from tests.testapp import channels
from tests.testapp.models import Document, Post

ignore_databases_override = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def pgpubsub_messages(**kwargs):
    return [m for m in run_checks(**kwargs) if (m.id or "").startswith("pgpubsub.")]


def ids(**kwargs):
    return sorted(m.id for m in pgpubsub_messages(**kwargs))


def with_default(**changes):
    """DATABASES with the default alias changed, for ``override_settings``."""
    return {**settings.DATABASES, "default": {**settings.DATABASES["default"], **changes}}


def notify_trigger(model, channel_cls):
    (trigger,) = [
        trigger
        for registered_model, trigger in pgtrigger.registered()
        if registered_model is model
        and isinstance(trigger, Notify)
        and trigger.name == channel_cls.listen_safe_name()
    ]
    return trigger


def execute(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@pytest.mark.django_db
def test_a_clean_configuration_gives_no_pgpubsub_messages():
    assert pgpubsub_messages() == []
    assert pgpubsub_messages(databases=["default"]) == []
    assert pgpubsub_messages(tags=["pgpubsub"], databases=["default"]) == []


def test_every_message_has_a_hint():
    overrides = {
        "PGPUBSUB_DATABASE": "missing",
        "PGPUBSUB_PASS_CONTEXT_TO_LISTENERS": "yes",
        "PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT": 1,
        "PGPUBSUB_LISTENER_FILTER": "tests.testapp.filters.Missing",
    }
    with override_settings(**overrides):
        messages = pgpubsub_messages()
    assert {m.id for m in messages} >= {"pgpubsub.E001", "pgpubsub.E003", "pgpubsub.E004"}
    assert all(m.hint for m in messages)


def test_database_alias_missing_from_databases():
    with override_settings(PGPUBSUB_DATABASE="listen"):
        (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.E001"
    assert "'listen'" in message.msg and "'default'" in message.msg
    assert "DATABASES" in message.hint


@ignore_databases_override
def test_database_alias_that_is_not_postgresql():
    databases = {
        **settings.DATABASES,
        "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    with override_settings(DATABASES=databases, PGPUBSUB_DATABASE="lite"):
        (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.E002"
    assert "sqlite" in message.msg
    assert "django.db.backends.postgresql" in message.hint


@ignore_databases_override
def test_database_alias_with_an_engine_that_does_not_import():
    with override_settings(DATABASES=with_default(ENGINE="nowhere.backend")):
        assert ids() == ["pgpubsub.E002"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"PGPUBSUB_PASS_CONTEXT_TO_LISTENERS": "yes"}, "pgpubsub.E003"),
        ({"PGPUBSUB_PASS_CONTEXT_TO_LISTENERS": 1}, "pgpubsub.E003"),
        ({"PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT": "False"}, "pgpubsub.E004"),
        ({"PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT": None}, "pgpubsub.E004"),
        ({"PGPUBSUB_DATABASE": None}, "pgpubsub.E005"),
        ({"PGPUBSUB_DATABASE": ["default"]}, "pgpubsub.E005"),
        ({"PGPUBSUB_HEALTH_MAX_BACKLOG_AGE": "300"}, "pgpubsub.E010"),
        ({"PGPUBSUB_HEALTH_MAX_BACKLOG_AGE": 0}, "pgpubsub.E010"),
        ({"PGPUBSUB_HEALTH_TOKEN": 12345}, "pgpubsub.E017"),
        ({"PGPUBSUB_HEALTH_TOKEN": b"secret"}, "pgpubsub.E017"),
        ({"PGPUBSUB_EMBEDDED": "yes"}, "pgpubsub.E011"),
        ({"PGPUBSUB_WORKERS": 0, "PGPUBSUB_EMBEDDED": True}, "pgpubsub.E011"),
        ({"PGPUBSUB_WORKERS": 2.5, "PGPUBSUB_EMBEDDED": True}, "pgpubsub.E011"),
        # Only embedded Runtimes read it: listen (--threads) must not refuse to start.
        ({"PGPUBSUB_WORKERS": 0}, "pgpubsub.W004"),
        ({"PGPUBSUB_QUEUE_SIZE": "100"}, "pgpubsub.E011"),
        ({"PGPUBSUB_CHANNELS": "tests.testapp.channels.Job"}, "pgpubsub.E011"),
        ({"PGPUBSUB_CHANNELS": ["tests.testapp.channels.Nope"]}, "pgpubsub.E011"),
        ({"PGPUBSUB_RECOVER_ON_START": 1}, "pgpubsub.E011"),
        ({"PGPUBSUB_SHUTDOWN_TIMEOUT": -1}, "pgpubsub.E011"),
        ({"PGPUBSUB_MAX_ATTEMPTS": 0}, "pgpubsub.E011"),
        ({"PGPUBSUB_MAX_ATTEMPTS": 2.0}, "pgpubsub.E011"),
        ({"PGPUBSUB_RETRY_DELAY": "2"}, "pgpubsub.E011"),
        ({"PGPUBSUB_RETRY_MAX_DELAY": 0}, "pgpubsub.E011"),
        ({"PGPUBSUB_SWEEP_INTERVAL": None}, "pgpubsub.E011"),
    ],
)
def test_settings_of_the_wrong_type(overrides, expected):
    with override_settings(**overrides):
        # (A truthy PGPUBSUB_PASS_CONTEXT_TO_LISTENERS acts as True, so listeners without
        # `context` are reported too: pgpubsub.E007.)
        messages = [m for m in pgpubsub_messages() if m.id != "pgpubsub.E007"]
    assert [m.id for m in messages] == [expected]
    name = next(iter(overrides))
    assert name in messages[0].msg and name in messages[0].hint


@pytest.mark.parametrize(
    "overrides",
    [
        {"PGPUBSUB_PASS_CONTEXT_TO_LISTENERS": False},
        {"PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT": True},
        {"PGPUBSUB_LISTENER_FILTER": "tests.testapp.filters.SkipMarkedRows"},
        {"PGPUBSUB_LISTENER_FILTER": None},
        {"PGPUBSUB_DATABASE": "default"},
        {"PGPUBSUB_EMBEDDED": False, "PGPUBSUB_WORKERS": 4, "PGPUBSUB_QUEUE_SIZE": 1},
        {"PGPUBSUB_CHANNELS": ["tests.testapp.channels.Job"], "PGPUBSUB_SHUTDOWN_TIMEOUT": 0.5},
        {"PGPUBSUB_RECOVER_ON_START": False},
    ],
)
def test_valid_settings_give_no_messages(overrides):
    with override_settings(**overrides):
        assert pgpubsub_messages() == []


@pytest.mark.parametrize(
    "path, reason",
    [
        ("tests.testapp.filters.Missing", "cannot be imported"),
        ("no_such_module.Filter", "cannot be imported"),
        ("SkipMarkedRows", "cannot be imported"),
        ("collections.OrderedDict", "no get_filter()"),
        ("tests.testapp.channels.Message", "cannot be instantiated"),
        (42, "must be a dotted path"),
    ],
)
def test_listener_filter_that_does_not_work_is_an_error_not_a_crash(path, reason):
    with override_settings(PGPUBSUB_LISTENER_FILTER=path):
        (message,) = pgpubsub_messages()
        assert message.id == "pgpubsub.E006"
        assert reason in message.msg
        assert "get_filter()" in message.hint
        with pytest.raises(SystemCheckError, match=r"pgpubsub\.E006"):
            call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


def test_listener_broken_by_a_later_pass_context_setting():
    def on_document(old, new):
        pass

    try:
        pgpubsub.post_save_listener(channels.DocumentTrigger)(on_document)  # fine: no context
        assert pgpubsub_messages() == []
        with override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True):
            messages = pgpubsub_messages()
    finally:
        registry[channels.DocumentTrigger].remove(on_document)
        _trigger_operations.pop((channels.DocumentTrigger, on_document), None)

    assert {m.id for m in messages} == {"pgpubsub.E007"}
    (mine,) = [m for m in messages if m.obj.endswith(".on_document")]
    assert "does not accept ['context']" in mine.msg
    assert channels.DocumentTrigger.name() in mine.msg
    assert "**kwargs" in mine.hint
    # Listeners taking **kwargs (tests.testapp.listeners.record_post) accept the context.
    assert not [m for m in messages if m.obj.endswith(".record_post")]


def test_signature_check_covers_plain_channel_listeners_registered_around_the_decorator():
    def on_message(key):
        pass

    channels.Message.register(on_message)  # no decorator, so no check at registration
    try:
        messages = pgpubsub_messages()
    finally:
        registry[channels.Message].remove(on_message)
    (message,) = messages
    assert message.id == "pgpubsub.E007"
    assert message.obj.endswith(".on_message")
    assert "'text'" in message.msg


@ignore_databases_override
def test_listen_database_behind_transaction_pooling_is_warned_about():
    with override_settings(
        DATABASES=with_default(DISABLE_SERVER_SIDE_CURSORS=True),
        PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT=True,
    ):
        (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.W003"
    assert "PgBouncer" in message.msg
    assert "PGPUBSUB_DATABASE" in message.hint and "session pooling" in message.hint


@ignore_databases_override
def test_a_direct_listen_alias_beside_a_pooled_default_is_fine():
    databases = {
        **with_default(DISABLE_SERVER_SIDE_CURSORS=True),
        "direct": dict(settings.DATABASES["default"]),
    }
    with override_settings(
        DATABASES=databases,
        PGPUBSUB_DATABASE="direct",
        PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT=True,
    ):
        assert pgpubsub_messages() == []


@pytest.fixture
def channel_on_other():
    """A plain channel on the database ``other``, with a listener while the test runs."""

    @dataclasses.dataclass
    class OnOther(pgpubsub.Channel):
        database = "other"
        key: str

    def on_other(key):
        pass

    OnOther.register(on_other)
    yield OnOther
    registry.pop(OnOther, None)
    _by_listen_name.pop(OnOther.listen_safe_name(), None)


def with_other(**changes):
    return {**settings.DATABASES, "other": {**settings.DATABASES["other"], **changes}}


@ignore_databases_override
def test_a_channel_database_behind_transaction_pooling_is_warned_about(channel_on_other):
    """Channels on a database of their own LISTEN through it (or the alias that
    PGPUBSUB_LISTEN_ALIASES names): the pooling check looks at that alias too."""
    with override_settings(
        DATABASES=with_other(DISABLE_SERVER_SIDE_CURSORS=True),
        PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT=True,
    ):
        (message,) = pgpubsub_messages()
        assert message.id == "pgpubsub.W003"
        assert "the channels on database 'other'" in message.msg and "'other'" in message.msg
        assert "PGPUBSUB_LISTEN_ALIASES" in message.hint

        databases = {**settings.DATABASES, "other_direct": dict(settings.DATABASES["default"])}
        with override_settings(
            DATABASES=databases, PGPUBSUB_LISTEN_ALIASES={"other": "other_direct"}
        ):
            assert pgpubsub_messages() == []


@pytest.mark.parametrize(
    "value",
    [["other"], {"other": 1}, {"other": "nowhere"}],
    ids=["not a dict", "not an alias", "unknown alias"],
)
def test_bad_listen_aliases_are_errors(value):
    with override_settings(PGPUBSUB_LISTEN_ALIASES=value):
        (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.E016"
    assert "PGPUBSUB_LISTEN_ALIASES" in message.msg


@ignore_databases_override
def test_session_bound_context_beside_transaction_pooling_is_warned_about():
    """Through transaction pooling a session-bound context passes to the next clients of
    the server connection (seen: one process's request_id in another's payloads)."""
    databases = {
        **with_default(DISABLE_SERVER_SIDE_CURSORS=True),
        "direct": dict(settings.DATABASES["default"]),
    }
    with override_settings(DATABASES=databases, PGPUBSUB_DATABASE="direct"):
        (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.W005"
    assert "'default'" in message.msg and "session-bound" in message.msg
    assert "PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT = True" in message.hint


@pytest.mark.django_db
def test_uninstalled_trigger_is_reported_only_by_check_database():
    trigger = notify_trigger(Post, channels.PostTrigger)
    trigger.uninstall(Post)

    assert pgpubsub_messages() == []  # plain `check` does not touch the database
    (message,) = pgpubsub_messages(databases=["default"])
    assert message.id == "pgpubsub.W001"
    assert message.obj is Post
    assert "is not installed in database 'default'" in message.msg
    assert channels.PostTrigger.name() in message.msg
    assert "makemigrations" in message.hint
    assert f"pgtrigger install {trigger.get_uri(Post)}" in message.hint

    stderr = io.StringIO()
    call_command("check", "--database", "default", stdout=io.StringIO(), stderr=stderr)
    assert "pgpubsub.W001" in stderr.getvalue()


@pytest.mark.django_db
def test_outdated_trigger_is_reported():
    trigger = notify_trigger(Post, channels.PostTrigger)
    execute(f"COMMENT ON TRIGGER {trigger.get_pgid(Post)} ON testapp_post IS 'an older hash'")
    (message,) = pgpubsub_messages(databases=["default"])
    assert message.id == "pgpubsub.W001"
    assert "differs from its definition" in message.msg


@pytest.mark.django_db
def test_disabled_trigger_is_reported():
    trigger = notify_trigger(Document, channels.DocumentTrigger)
    execute(f"ALTER TABLE testapp_document DISABLE TRIGGER {trigger.get_pgid(Document)}")
    (message,) = pgpubsub_messages(databases=["default"])
    assert message.id == "pgpubsub.W002"
    assert message.obj is Document
    assert f"pgtrigger enable {trigger.get_uri(Document)}" in message.hint


@pytest.mark.django_db
def test_missing_sql_function_is_an_error():
    execute("DROP FUNCTION pgpubsub_store(text, jsonb)")
    (message,) = pgpubsub_messages(databases=["default"])
    assert message.id == "pgpubsub.E008"
    assert "pgpubsub_store(text,jsonb)" in message.msg
    assert "pgpubsub_notify" not in message.msg
    assert "migrate" in message.hint
    with pytest.raises(SystemCheckError, match=r"pgpubsub\.E008"):
        call_command("check", "--database", "default", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_functions_installed_under_other_notify_on_write_settings_are_a_warning():
    from pgpubsub.db_functions import install_functions

    assert pgpubsub_messages(databases=["default"]) == []
    with override_settings(PGPUBSUB_NOTIFY_ON_WRITE=True):
        (message,) = pgpubsub_messages(databases=["default"])
        assert message.id == "pgpubsub.W006"
        assert "migrate" in message.hint
        install_functions("default")  # what migrate does
        try:
            assert pgpubsub_messages(databases=["default"]) == []
        finally:
            with override_settings(PGPUBSUB_NOTIFY_ON_WRITE=False):
                install_functions("default")
    assert pgpubsub_messages(databases=["default"]) == []
    # Functions of a version without per-channel choice are reported too.
    execute("DROP FUNCTION pgpubsub_notify_on_write(text)")
    try:
        assert ids(databases=["default"]) == ["pgpubsub.W006"]
    finally:
        install_functions("default")


@pytest.mark.django_db
def test_database_that_migrate_is_about_to_update_is_not_reported():
    # `migrate` runs these checks before migrating: what it is about to install must not stop it.
    execute("DROP FUNCTION pgpubsub_notify(text, text)")
    execute("DELETE FROM django_migrations WHERE app = 'pgpubsub' AND name >= '0007'")
    assert pgpubsub_messages(databases=["default"]) == []

    notify_trigger(Post, channels.PostTrigger).uninstall(Post)
    assert ids(databases=["default"]) == ["pgpubsub.W001"]
    execute("DELETE FROM django_migrations WHERE app = 'testapp'")
    assert pgpubsub_messages(databases=["default"]) == []


def test_unreachable_database_is_reported_by_the_check_command(tmp_path):
    (tmp_path / "unreachable_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "DATABASES['down'] = {**DATABASES['default'], 'HOST': '127.0.0.1', 'PORT': '1'}\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "unreachable_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, str(MANAGE), "check", "--database", "down"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "pgpubsub.E009" in result.stderr
    assert "Could not inspect database 'down'" in result.stderr


def test_a_bad_max_concurrency_fails_when_the_channel_is_defined():
    """Reported as pgpubsub.E012 by `manage.py check` before; now the class cannot be defined."""
    from dataclasses import dataclass

    with pytest.raises(ValueError, match="Throttled.max_concurrency must be a positive int"):

        @dataclass
        class Throttled(channels.Message):
            max_concurrency = 0


@pytest.mark.parametrize(
    ("attributes", "wrong"),
    [
        ({"max_attempts": 0}, "Retried.max_attempts must be a positive int or None, not 0"),
        ({"retry_delay": "1s"}, "Retried.retry_delay must be a positive number of seconds"),
    ],
)
def test_bad_retry_attributes_fail_when_the_channel_is_defined(attributes, wrong):
    """Reported as pgpubsub.E015 by `manage.py check` before; now the class cannot be defined."""
    with pytest.raises(ValueError, match=wrong):
        type("Retried", (channels.Job,), {"__module__": __name__, **attributes})


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        ("tests.testapp.no_such_module.Policy", "names nothing that can be imported"),
        ("tests.testapp.retry_channels.Transient", "must be a retry policy"),
    ],
)
def test_a_retry_path_that_names_no_policy_is_reported(path, wrong):
    from dataclasses import dataclass

    Retried = dataclass(type("Retried", (channels.Job,), {"__module__": __name__, "retry": path}))
    registry[Retried].append(lambda key, text: None)
    try:
        messages = pgpubsub_messages()
    finally:
        del registry[Retried]
    assert [m.id for m in messages] == ["pgpubsub.E015"]
    assert f"Retried.retry = {path!r}" in messages[0].msg and wrong in messages[0].msg
    assert messages[0].obj is Retried


class LiteRouter:
    """Sends pgpubsub's models to the "lite" database."""

    def db_for_write(self, model, **hints):
        return "lite" if model._meta.app_label == "pgpubsub" else None

    db_for_read = db_for_write


@ignore_databases_override
def test_embedded_mode_on_a_database_that_is_not_postgresql():
    databases = {
        **settings.DATABASES,
        "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    router = f"{__name__}.LiteRouter"
    with override_settings(DATABASES=databases, DATABASE_ROUTERS=[router]):
        assert ids() == []  # off: nothing to say
        with override_settings(PGPUBSUB_EMBEDDED=True):
            (message,) = pgpubsub_messages()
    assert message.id == "pgpubsub.E013"
    assert "'lite'" in message.msg and "sqlite" in message.msg


@pytest.mark.parametrize(
    "alias, problem", [("nowhere", "is not a key of DATABASES"), ("lite", "sqlite")]
)
@ignore_databases_override
def test_a_channel_database_that_cannot_work_is_reported(alias, problem):
    from dataclasses import dataclass

    @dataclass
    class Elsewhere(channels.Message):
        database = alias

    databases = {
        **settings.DATABASES,
        "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    registry[Elsewhere].append(lambda key, text: None)
    try:
        with override_settings(DATABASES=databases):
            messages = pgpubsub_messages()
    finally:
        del registry[Elsewhere]
    assert [m.id for m in messages] == ["pgpubsub.E014"]
    assert f"Elsewhere.database = {alias!r}" in messages[0].msg and problem in messages[0].msg
