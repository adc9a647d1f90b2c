"""The admin of stored notifications, driven over real HTTP against a live server: log in, list,
filter, search, read a payload and a traceback, retry rows now, delete them; and with tens of
thousands of rows stored, as after an outage."""

from __future__ import annotations

import datetime
import html
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.connection import ListenConnection, wait_any
from pgpubsub.models import Notification
from tests.processes import ROOT, ListenProcesses, no_watcher, wait_for
from tests.testapp import channels
from tests.testapp.models import Author, Effect

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/pgpubsub/notification/"
PASSWORD = "admin-password"
#: Seconds to wait for a notification or a listener's work.
TIMEOUT = 20.0
#: A LISTEN name no channel of the test app has.
UNKNOWN_CHANNEL = "pgpubsub_fffff"


class Browser:
    """An HTTP client with a cookie jar, for the admin of a live server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def request(self, path: str, data: dict | None = None) -> tuple[int, str]:
        """(status, body) of a GET, or of a POST of ``data`` (redirects are followed)."""
        body = None
        if data is not None:
            data = {**data, "csrfmiddlewaretoken": self.csrf_token()}
            body = urllib.parse.urlencode(data, doseq=True).encode()
        try:
            with self.opener.open(self.base_url + path, body, timeout=TIMEOUT) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read().decode()

    def get(self, path: str, **params: str) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, text = self.request(path + query)
        assert status == 200, text
        return text

    def post(self, path: str, data: dict) -> str:
        status, text = self.request(path, data)
        assert status == 200, text
        return text

    def csrf_token(self) -> str:
        return next(cookie.value for cookie in self.cookies if cookie.name == "csrftoken")

    def log_in(self, username: str, password: str) -> None:
        self.get("/admin/login/")  # sets the CSRF cookie
        page = self.post(
            "/admin/login/?next=/admin/",
            {"username": username, "password": password, "next": "/admin/"},
        )
        assert "Log out" in page, page

    def action(self, name: str, ids: list[int], **extra: str) -> str:
        """Run a changelist action on the rows ``ids``."""
        return self.post(
            CHANGELIST,
            {"action": name, "_selected_action": [str(pk) for pk in ids], "index": "0", **extra},
        )


@pytest.fixture
def browser(live_server, django_user_model) -> Browser:
    django_user_model.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    client = Browser(live_server.url)
    client.log_in("admin", PASSWORD)
    return client


@pytest.fixture
def processes():
    started = ListenProcesses()
    yield started
    started.stop_all()


@pytest.fixture
def listen_connection():
    """A dedicated connection (the live server and this thread each have their own)."""
    conn = ListenConnection("default")
    conn.connect()
    yield conn
    conn.close()


@dataclass
class Unregistered(Channel):
    """A lockable channel without listeners (so not in the channel registry)."""

    lock_notifications = True
    key: str


def store_job(key: str, text: str = "") -> Notification:
    pgpubsub.notify(channels.Job, key=key, text=text)
    return Notification.objects.get(payload__kwargs__key=key)


def listed_ids(page: str) -> list[int]:
    """Row ids in the changelist, top to bottom."""
    return [int(pk) for pk in re.findall(r'<th class="field-id"><a href="[^"]*">(\d+)</a>', page)]


def cells(page: str, column: str) -> list[str]:
    return [
        html.unescape(text)
        for text in re.findall(rf'<td class="field-{column}[^"]*">(.*?)</td>', page, re.S)
    ]


def filter_choices(page: str) -> dict[str, str]:
    """Label -> channel value of the channel filter's choices."""
    return {
        html.unescape(label): urllib.parse.parse_qs(html.unescape(query))["channel"][0]
        for query, label in re.findall(r'<a href="\?([^"]*channel=[^"]*)"[^>]*>([^<]+)</a>', page)
    }


def messages(page: str) -> list[str]:
    block = re.search(r'<ul class="messagelist">(.*?)</ul>', page, re.S)
    return [html.unescape(m) for m in re.findall(r"<li[^>]*>(.*?)</li>", block.group(1), re.S)]


def receive(conn: ListenConnection, count: int) -> list[tuple[str, str]]:
    """(channel, payload) of ``count`` notifications, waiting at most TIMEOUT seconds in all,
    plus any that arrived with them."""
    received: list[tuple[str, str]] = []
    deadline = time.monotonic() + TIMEOUT
    while len(received) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"received {received}, expected {count} notifications"
        received += [(n.channel, n.payload) for n in wait_any([conn], min(remaining, 1.0))]
    return received + [(n.channel, n.payload) for n in wait_any([conn], 0)]


def test_changelist_lists_stored_rows_oldest_first(browser):
    job = store_job("first")
    Author.objects.create(name="Ann")  # a lockable trigger channel: its row has a db_version
    trigger = Notification.objects.get(channel=channels.AuthorTrigger.listen_safe_name())
    unknown = Notification.objects.create(channel=UNKNOWN_CHANNEL, payload={"kwargs": {}})
    pgpubsub.notify(channels.Message, key="plain")  # not lockable: never stored

    page = browser.get(CHANGELIST)

    assert listed_ids(page) == [job.pk, trigger.pk, unknown.pk]
    assert cells(page, "channel_name") == [
        "tests.testapp.channels.Job",
        "tests.testapp.channels.AuthorTrigger",
        UNKNOWN_CHANNEL,
    ]
    assert all(re.fullmatch(r"\d+s", age) for age in cells(page, "age")), cells(page, "age")
    assert cells(page, "db_version") == ["-", str(trigger.db_version), "-"]
    assert trigger.db_version is not None
    assert f"{CHANGELIST}add/" not in page  # no "Add" button


def test_no_adding_and_no_editing(browser):
    row = store_job("job", text="before")

    assert browser.request(f"{CHANGELIST}add/")[0] == 403
    page = browser.get(f"{CHANGELIST}{row.pk}/change/")
    assert 'name="_save"' not in page
    status, _ = browser.request(
        f"{CHANGELIST}{row.pk}/change/", {"channel": "other", "payload": "{}"}
    )
    assert status == 403
    row.refresh_from_db()
    assert row.channel == channels.Job.listen_safe_name()


def test_filter_by_channel(browser):
    jobs = [store_job("a").pk, store_job("b").pk]
    # A row as django-pgpubsub 1.x notify() stored it: under the channel's dotted name.
    jobs.append(Notification.objects.create(channel=channels.Job.name(), payload={}).pk)
    unknown = Notification.objects.create(channel=UNKNOWN_CHANNEL, payload={"kwargs": {}}).pk

    choices = filter_choices(browser.get(CHANGELIST))

    assert choices == {
        "tests.testapp.channels.Job": "tests.testapp.channels.Job",
        UNKNOWN_CHANNEL: UNKNOWN_CHANNEL,
    }
    job_page = browser.get(CHANGELIST, channel=choices["tests.testapp.channels.Job"])
    assert listed_ids(job_page) == jobs
    assert listed_ids(browser.get(CHANGELIST, channel=UNKNOWN_CHANNEL)) == [unknown]


def test_search_by_channel_name_and_id(browser):
    jobs = [store_job("a").pk, store_job("b").pk]
    unknown = Notification.objects.create(channel=UNKNOWN_CHANNEL, payload={"kwargs": {}}).pk

    assert listed_ids(browser.get(CHANGELIST, q="testapp.channels.job")) == jobs
    assert listed_ids(browser.get(CHANGELIST, q=channels.Job.listen_safe_name())) == jobs
    assert listed_ids(browser.get(CHANGELIST, q="fffff")) == [unknown]
    assert listed_ids(browser.get(CHANGELIST, q=str(jobs[1]))) == [jobs[1]]
    assert listed_ids(browser.get(CHANGELIST, q="no such thing")) == []


def test_change_page_shows_the_payload_as_escaped_pretty_json(browser):
    text = '<script>alert("x")</script> & ünïcode'
    row = store_job("shown", text=text)

    page = browser.get(f"{CHANGELIST}{row.pk}/change/")

    assert "<script>alert" not in page
    pre = re.search(r"<pre[^>]*>(.*?)</pre>", page, re.S).group(1)
    shown = html.unescape(pre)
    assert json.loads(shown) == {"kwargs": {"key": "shown", "text": text}}
    assert '\n  "kwargs": {\n    "key": "shown",' in shown
    assert "tests.testapp.channels.Job" in page


def test_retry_now_sends_each_selected_rows_notify(browser, listen_connection):
    rows = [store_job(f"job-{n}") for n in range(3)]
    # A row as django-pgpubsub 1.x notify() stored it: under the channel's dotted name.
    legacy = Notification.objects.create(
        channel=channels.Job.name(), payload={"kwargs": {"key": "legacy", "text": ""}}
    )
    # ... and one of a channel that this process has no listener for.
    unregistered = Notification.objects.create(channel=Unregistered.name(), payload={})
    listen_connection.listen([channels.Job.listen_safe_name(), Unregistered.listen_safe_name()])
    selected = [rows[0].pk, rows[2].pk, legacy.pk, unregistered.pk]

    page = browser.action("retry_now", selected)

    assert "Sent 4 notifications; running listeners will process them." in messages(page)
    # Sent in one transaction: they arrive together, and nothing else comes with them.
    assert sorted(receive(listen_connection, 4)) == sorted(
        [
            (channels.Job.listen_safe_name(), str(rows[0].pk)),
            (channels.Job.listen_safe_name(), str(rows[2].pk)),
            (channels.Job.listen_safe_name(), str(legacy.pk)),
            (Unregistered.listen_safe_name(), str(unregistered.pk)),
        ]
    )
    assert Notification.objects.count() == 5  # the rows stay until a listener processes them


#: Sweeps so rare that a row a listener processes within ``TIMEOUT`` was not swept.
NO_SWEEPS = {"PGPUBSUB_TEST_SWEEP_INTERVAL": "300"}


def test_retry_now_has_a_running_listener_process_the_rows(browser, processes):
    rows = [store_job(f"late-{n}", text="work") for n in range(3)]
    legacy = Notification.objects.create(
        channel=channels.Job.name(), payload={"kwargs": {"key": "late-legacy", "text": "work"}}
    )
    with no_watcher():
        # Nothing wakes the listener for these rows: no watcher, no NOTIFY, no --recover, and
        # its first sweep is minutes away.
        processes.start(env=NO_SWEEPS)
        assert Notification.objects.count() == 4

        page = browser.action("retry_now", [row.pk for row in rows] + [legacy.pk])

        assert "Sent 4 notifications; running listeners will process them." in messages(page)
        wait_for(
            lambda: (
                Notification.objects.count() == 0
                and Effect.objects.filter(key__startswith="late-").count() == 4
            ),
            TIMEOUT,
            lambda: f"rows processed; {Notification.objects.count()} still stored",
            watch=processes.started,
        )
    assert sorted(Effect.objects.values_list("key", flat=True)) == [
        "late-0",
        "late-1",
        "late-2",
        "late-legacy",
    ]


def test_retry_now_needs_the_change_permission(live_server, django_user_model, browser):
    row = store_job("job")
    viewer = django_user_model.objects.create_user("viewer", password=PASSWORD, is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_notification"))
    client = Browser(live_server.url)
    client.log_in("viewer", PASSWORD)

    assert 'value="retry_now"' in browser.get(CHANGELIST)
    page = client.get(CHANGELIST)
    assert listed_ids(page) == [row.pk]
    assert 'value="retry_now"' not in page
    assert 'value="delete_selected"' not in page


def mark_failed(row: Notification, attempts: int = 5, error: str = "RuntimeError: boom") -> None:
    Notification.objects.filter(pk=row.pk).update(
        attempts=attempts,
        failed_at=timezone.now(),
        last_error=error,
        last_traceback='Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom',
    )


def test_failures_are_listed_with_status_attempts_next_attempt_and_error(browser):
    pending, retrying, failed = (store_job(key) for key in ("pending", "retrying", "failed"))
    Notification.objects.filter(pk=retrying.pk).update(
        attempts=2,
        next_attempt_at=timezone.now() + datetime.timedelta(minutes=5),
        last_error="ValueError: " + "long " * 40,
    )
    mark_failed(failed)

    page = browser.get(CHANGELIST)

    assert listed_ids(page) == [pending.pk, retrying.pk, failed.pk]
    assert cells(page, "status") == ["pending", "retrying", "failed"]
    assert cells(page, "attempts") == ["0", "2", "5"]
    assert cells(page, "next_attempt_at")[0] == "-"
    assert cells(page, "next_attempt_at")[1] != "-"
    errors = cells(page, "error")
    assert errors[0] == "-"
    assert errors[1].startswith("ValueError: long long") and errors[1].endswith("…")
    assert len(errors[1]) == 80
    assert errors[2] == "RuntimeError: boom"
    for status, expected in [("pending", pending), ("retrying", retrying), ("failed", failed)]:
        assert listed_ids(browser.get(CHANGELIST, status=status)) == [expected.pk], status
    assert listed_ids(browser.get(CHANGELIST, q="boom")) == [failed.pk]


def test_change_page_shows_the_error_and_its_traceback(browser):
    row = store_job("broken")
    mark_failed(row, error="RuntimeError: <b>boom</b>")

    page = browser.get(f"{CHANGELIST}{row.pk}/change/")

    assert "<b>boom</b>" not in page
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in page
    traceback = html.unescape(re.findall(r"<pre[^>]*>(.*?)</pre>", page, re.S)[1])
    assert traceback.startswith("Traceback (most recent call last):")


def test_retry_now_gives_failed_rows_new_attempts(browser, processes):
    failed = store_job("given-up", text="work")
    mark_failed(failed)
    processes.start("--recover")  # even a sweep leaves failed rows alone
    store_job("fresh", text="work")
    wait_for(
        lambda: Effect.objects.filter(key="fresh").exists(),
        TIMEOUT,
        "the fresh job",
        watch=processes.started,
    )
    assert Notification.objects.get(pk=failed.pk).status == "failed"

    page = browser.action("retry_now", [failed.pk])

    assert "Sent 1 notification; a running listener will process it." in messages(page)
    wait_for(
        lambda: not Notification.objects.exists(),
        TIMEOUT,
        "the retried row to be processed",
        watch=processes.started,
    )
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["fresh", "given-up"]


def test_change_page_names_the_row_by_id_channel_and_status(browser):
    job = store_job("named")
    unknown = Notification.objects.create(channel=UNKNOWN_CHANNEL, payload={"kwargs": {}})
    mark_failed(unknown)

    for row, name in [
        (job, f"Notification {job.pk} (tests.testapp.channels.Job, pending)"),
        (unknown, f"Notification {unknown.pk} ({UNKNOWN_CHANNEL}, failed)"),
    ]:
        page = browser.get(f"{CHANGELIST}{row.pk}/change/")
        assert "Notification object" not in page
        assert re.search(r"<title>(.*?)</title>", page, re.S).group(1).startswith(f"{name} |")
        assert f"<h2>{name}</h2>" in page
        trail = re.search(r'class="breadcrumbs"[^>]*>(.*?)</(?:div|ol)>', page, re.S).group(1)
        assert html.unescape(re.sub(r"<[^>]+>", "", trail)).strip().endswith(name), trail


def store_rows(count: int, channel: str) -> list[int]:
    """Ids of ``count`` rows stored under ``channel`` in one statement (as a backlog piles up)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO pgpubsub_notification (channel, payload) "
            "SELECT %s, jsonb_build_object('kwargs', jsonb_build_object('key', n::text, "
            "'text', repeat('x', 200))) FROM generate_series(1, %s) AS n RETURNING id",
            [channel, count],
        )
        return sorted(pk for (pk,) in cursor.fetchall())


def confirm(browser: Browser, page: str) -> str:
    """Submit the confirmation form of ``page`` as a browser would: its hidden fields, to its
    action."""
    form = re.search(r'<form method="post" action="([^"]*)">(.*?)</form>', page, re.S)
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(2)
    ):
        fields.setdefault(html.unescape(name), []).append(html.unescape(value))
    fields.pop("csrfmiddlewaretoken")
    return browser.post(html.unescape(form.group(1)), fields)


def confirmation_summary(page: str) -> tuple[str, dict[str, str]]:
    """The question of a delete confirmation page, and its rows per channel."""
    question = re.search(r'<p id="delete-count">(.*?)</p>', page, re.S).group(1)
    table = re.search(r'<table id="delete-channels">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", table)
    return html.unescape(question), {html.unescape(k): v for k, v in rows}


def test_delete_selected_asks_with_a_summary_then_deletes_those_rows(browser):
    jobs = [store_job(f"job-{n}").pk for n in range(3)]
    legacy = Notification.objects.create(channel=channels.Job.name(), payload={}).pk
    unknown = Notification.objects.create(channel=UNKNOWN_CHANNEL, payload={"kwargs": {}}).pk
    selected = [jobs[0], jobs[2], legacy, unknown]

    page = browser.action("delete_selected", selected)

    question, per_channel = confirmation_summary(page)
    assert question.startswith("Delete 4 stored notifications?")
    assert per_channel == {"tests.testapp.channels.Job": "3", UNKNOWN_CHANNEL: "1"}
    assert Notification.objects.count() == 5
    assert f'href="{CHANGELIST}" class="button cancel-link"' in page

    page = confirm(browser, page)

    assert "Successfully deleted 4 notifications." in messages(page)
    assert list(Notification.objects.values_list("pk", flat=True)) == [jobs[1]]
    assert listed_ids(page) == [jobs[1]]


def test_delete_needs_the_delete_permission(live_server, django_user_model):
    row = store_job("kept")
    user = django_user_model.objects.create_user("operator", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_notification", "change_notification"])
    )
    client = Browser(live_server.url)
    client.log_in("operator", PASSWORD)

    page = client.action("delete_selected", [row.pk])
    page = client.action("delete_selected", [row.pk], post="yes", pgpubsub_upto=str(row.pk))

    assert "Are you sure" not in page and 'id="delete-count"' not in page
    assert "No action selected." in messages(page)
    assert Notification.objects.filter(pk=row.pk).exists()


#: Rows of the tests at scale: enough that listing each on one page would take megabytes.
MANY = 20_000


def test_delete_across_pages_shows_a_small_page_and_deletes_what_it_counted(browser):
    jobs = store_rows(MANY, channels.Job.listen_safe_name())
    others = store_rows(5, UNKNOWN_CHANNEL)
    job_list = f"{CHANGELIST}?channel=tests.testapp.channels.Job"
    first_page = listed_ids(browser.get(job_list))
    assert first_page == jobs[:100]

    # "Select all 20000 notifications" over the filtered list, then the action.
    page = browser.post(
        job_list,
        {
            "action": "delete_selected",
            "select_across": "1",
            "index": "0",
            "_selected_action": [str(pk) for pk in first_page],
        },
    )

    assert len(page.encode()) < 50_000, len(page.encode())
    question, per_channel = confirmation_summary(page)
    assert question.startswith(f"Delete {MANY} stored notifications?")
    assert per_channel == {"tests.testapp.channels.Job": str(MANY)}
    assert f'href="{html.escape(job_list)}" class="button cancel-link"' in page
    # Stored after the page was shown: not what the user agreed to delete.
    later = store_rows(1, channels.Job.listen_safe_name())

    page = confirm(browser, page)

    assert f"Successfully deleted {MANY} notifications." in messages(page)
    assert sorted(Notification.objects.values_list("pk", flat=True)) == others + later


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
def test_delete_leaves_rows_a_listener_is_processing_without_waiting_for_them(browser):
    rows = [store_job(f"job-{n}").pk for n in range(3)]
    page = browser.action("delete_selected", rows)

    # A listener claims a row as SELECT ... FOR UPDATE in its transaction, on its connection.
    with transaction.atomic(using="side"):
        Notification.objects.using("side").select_for_update().get(pk=rows[1])
        page = confirm(browser, page)

    assert messages(page) == [
        "Successfully deleted 2 notifications. 1 that a listener was processing was left to it."
    ]
    assert list(Notification.objects.values_list("pk", flat=True)) == [rows[1]]


def test_the_list_of_many_rows_counts_once_and_loads_no_payloads(client, django_user_model):
    store_rows(MANY, channels.Job.listen_safe_name())
    failed = store_rows(3, UNKNOWN_CHANNEL)
    Notification.objects.filter(pk__in=failed).update(failed_at=timezone.now(), attempts=5)
    client.force_login(django_user_model.objects.create_superuser("admin", password=PASSWORD))

    for params, shown in [({}, 100), ({"status": "failed"}, 3), ({"status": "pending"}, 100)]:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(CHANGELIST, params)
        assert response.status_code == 200
        assert len(listed_ids(response.content.decode())) == shown
        sql = [query["sql"] for query in queries.captured_queries]
        # The session, the user, the channel filter's choices, one count, one page of rows.
        assert len(sql) <= 5, sql
        assert len([q for q in sql if "COUNT(" in q]) == 1, sql
        assert not [q for q in sql if '"payload"' in q or '"last_traceback"' in q], sql


def test_importable_without_the_admin_app():
    """Without django.contrib.admin installed the module imports and registers nothing."""
    code = (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['django.contrib.contenttypes', "
        "'django.contrib.auth', 'pgtrigger', 'pgpubsub'])\n"
        "django.setup()\n"
        "import pgpubsub.admin\n"
        "print(pgpubsub.admin.NotificationAdmin.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "NotificationAdmin"
