"""Every name of django-pgpubsub 1.3.1's public surface exists here and behaves as it did."""

import importlib
import threading

import pytest
from django.core.management import call_command, get_commands, load_command_class

import pgpubsub
from pgpubsub import listen as listen_module
from pgpubsub.models import Notification
from tests.processes import LISTEN_SESSION
from tests.testapp import channels
from tests.testapp.models import Effect

TOP_LEVEL = [
    "Channel",
    "TriggerChannel",
    "set_notification_context",
    "listener",
    "pre_save_listener",
    "post_save_listener",
    "pre_insert_listener",
    "post_insert_listener",
    "pre_update_listener",
    "post_update_listener",
    "pre_delete_listener",
    "post_delete_listener",
    "trigger_listener",
    "ListenerFilterProvider",
    "notify",
    "process_stored_notifications",
]


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_names(name):
    assert hasattr(pgpubsub, name)
    assert name in pgpubsub.__all__


@pytest.mark.parametrize(
    "module, names",
    [
        (
            "pgpubsub.channel",
            [
                "BaseChannel",
                "Channel",
                "TriggerChannel",
                "registry",
                "locate_channel",
                "ChannelNotFound",
                "set_notification_context",
            ],
        ),
        ("pgpubsub.notify", ["notify", "process_stored_notifications"]),
        ("pgpubsub.listen", ["listen", "listen_to_channels", "process_notifications", "POLL"]),
        ("pgpubsub.models", ["Notification"]),
        ("pgpubsub.triggers", ["Notify", "LockableNotify"]),
        ("pgpubsub.compatibility", ["ConnectionWrapper", "Notify"]),
    ],
)
def test_module_names(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert hasattr(loaded, name), f"{module}.{name}"


def test_channel_classmethods():
    for method in (
        "name",
        "listen_safe_name",
        "get",
        "register",
        "deserialize",
        "build_from_payload",
    ):
        assert callable(getattr(channels.Job, method))
    assert callable(channels.Job(key="k").serialize)


def test_notification_model_fields_and_ordering():
    fields = {field.name for field in Notification._meta.get_fields()}
    assert {"id", "channel", "payload", "created_at", "db_version"} <= fields
    assert Notification._meta.db_table == "pgpubsub_notification"
    assert Notification._meta.ordering == ["created_at"]


@pytest.mark.django_db
def test_notification_from_channel_is_a_queryset_of_that_channel():
    Notification.objects.create(channel=channels.Job.listen_safe_name(), payload={})
    Notification.objects.create(channel=channels.FailingJob.listen_safe_name(), payload={})
    assert Notification.from_channel(channels.Job).count() == 1


def test_listen_command_accepts_the_1_3_1_options():
    assert get_commands()["listen"] == "pgpubsub"
    command = load_command_class("pgpubsub", "listen")
    parser = command.create_parser("manage.py", "listen")
    options = parser.parse_args(
        [
            "--channels",
            "tests.testapp.channels.Job",
            "tests.testapp.channels.Message",
            "--processes",
            "2",
            "--recover",
            "--worker-start-method",
            "fork",
            "--no-restart-on-failure",
            "--loglevel",
            "debug",
            "--logformat",
            "%(message)s",
        ]
    )
    assert options.channels == ["tests.testapp.channels.Job", "tests.testapp.channels.Message"]
    assert options.processes == 2 and options.recover and options.no_restart_on_failure
    assert options.worker_start_method == "fork"
    assert parser.parse_args(["--worker"]).worker


def test_listen_command_rejects_an_unknown_channel():
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="No channel class"):
        call_command("listen", "--channels", "tests.testapp.channels.Nope")


@pytest.mark.django_db(transaction=True)
def test_listen_with_poll_false_processes_stored_notifications_and_returns(monkeypatch):
    for key in ("a", "b", "c"):
        pgpubsub.notify(channels.Job, key=key)
    monkeypatch.setattr(listen_module, "POLL", False)
    listen_module.listen(recover=True)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["a", "b", "c"]
    assert Notification.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(30)
def test_listen_processes_notifications_until_stopped():
    errors = []

    def run():
        try:
            listen_module.listen([channels.Job])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-listen")
    thread.start()
    try:
        _wait_for(lambda: _listening_backends() >= 1, "the listener to LISTEN")
        for i in range(20):
            pgpubsub.notify(channels.Job, key=f"k{i}")
        _wait_for(lambda: Effect.objects.count() == 20, "20 jobs to be processed")
    finally:
        listen_module.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert errors == []
    assert Notification.objects.count() == 0


def _listening_backends():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            f"AND pid <> pg_backend_pid() AND {LISTEN_SESSION}"
        )
        return cursor.fetchone()[0]


def _wait_for(condition, what, timeout=15.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.django_db(transaction=True)
def test_wrapper_notifies_can_be_cleared_to_simulate_a_missed_notification(listening):
    pgpubsub.notify(channels.Job, key="missed")
    listening.poll()
    assert len(listening.notifies) == 1
    listening.notifies = []
    listen_module.process_notifications(listening)
    assert not Effect.objects.exists()
    assert Notification.objects.count() == 1  # stored, so recoverable
    pgpubsub.process_stored_notifications()
    listen_module.process_notifications(listening)
    assert Effect.objects.get().key == "missed"


@pytest.mark.django_db(transaction=True)
def test_compatibility_notify_is_what_the_wrapper_collects(listening):
    """``pgpubsub.compatibility.Notify`` is the type of the items in ``wrapper.notifies`` on
    whichever driver Django uses."""
    from pgpubsub.compatibility import Notify

    pgpubsub.notify(channels.Message, key="typed")
    listening.poll()
    assert listening.notifies and all(isinstance(item, Notify) for item in listening.notifies)
