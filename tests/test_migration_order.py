"""Triggers work as soon as they exist, whatever order the migrations run in: a project whose
app sorts before ``pgpubsub`` (``accounts``) migrates an empty database even when a data
migration of that app writes rows through its triggers, and so do its squashed migrations and
a test database built without migrations.

Each test builds the project in a temporary directory and runs ``django-admin`` on it in a
subprocess, against new empty databases on the test session's server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

from tests.processes import ROOT, wait_for

pytestmark = pytest.mark.timeout(180)

SETTINGS = """
import os
from pgpubsub.testing.postgres import django_database

SECRET_KEY = "migration-order"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "accounts",
    "audit",
    "pgtrigger",
    "pgpubsub",
]
DATABASES = {"default": django_database(os.environ["DATABASE_URL"])}
if os.environ.get("NO_MIGRATIONS"):  # as pytest-django --no-migrations does
    DATABASES["default"]["TEST"] = {"MIGRATE": False}
    PGTRIGGER_INSTALL_ON_MIGRATE = True  # pgtrigger's way to install triggers without migrations
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
"""

# accounts: a lockable trigger channel (its trigger stores a row in pgpubsub_notification).
ACCOUNTS = {
    "__init__.py": "",
    "apps.py": """
        from django.apps import AppConfig


        class AccountsConfig(AppConfig):
            name = "accounts"

            def ready(self):
                from accounts import listeners  # noqa: F401
    """,
    "models.py": """
        from django.db import models


        class Account(models.Model):
            name = models.TextField()
    """,
    "channels.py": """
        from dataclasses import dataclass

        from pgpubsub import TriggerChannel

        from accounts.models import Account


        @dataclass
        class AccountCreated(TriggerChannel):
            model = Account
            lock_notifications = True
    """,
    "listeners.py": """
        import os

        import pgpubsub

        from accounts.channels import AccountCreated


        @pgpubsub.post_insert_listener(AccountCreated)
        def welcome(old, new):
            if os.environ.get("WELCOMED"):
                with open(os.environ["WELCOMED"], "a") as file:
                    file.write(new.name + "\\n")
    """,
    "tests.py": """
        from django.test import TestCase

        from pgpubsub.models import Notification

        from accounts.models import Account
        from audit.models import Entry


        class TriggersWork(TestCase):
            def test_writes_go_through_the_triggers(self):
                Account.objects.create(name="in a test")
                Entry.objects.create(text="in a test")
                self.assertEqual(Notification.objects.count(), 1)
    """,
}

# audit: a plain trigger channel (its trigger only calls pgpubsub_notify()).
AUDIT = {
    "__init__.py": "",
    "apps.py": """
        from django.apps import AppConfig


        class AuditConfig(AppConfig):
            name = "audit"

            def ready(self):
                from audit import listeners  # noqa: F401
    """,
    "models.py": """
        from django.db import models


        class Entry(models.Model):
            text = models.TextField()
    """,
    "listeners.py": """
        from dataclasses import dataclass

        import pgpubsub
        from pgpubsub import TriggerChannel

        from audit.models import Entry


        @dataclass
        class EntryWritten(TriggerChannel):
            model = Entry


        @pgpubsub.post_save_listener(EntryWritten)
        def log(old, new):
            pass
    """,
}


def data_migration(app: str, depends_on: str) -> str:
    # The function lives in a module of the app, so that squashmigrations can refer to it.
    return textwrap.dedent(
        f"""
        from django.db import migrations

        from {app}.data import create


        class Migration(migrations.Migration):
            dependencies = [("{app}", "{depends_on}")]
            operations = [migrations.RunPython(create, migrations.RunPython.noop)]
        """
    )


DATA = """
def create(apps, schema_editor):
    apps.get_model("{app}", "{model}").objects.create({field}="from a data migration")
"""


def write_app(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name / "migrations").mkdir(parents=True)
    (root / name / "migrations" / "__init__.py").write_text("")
    for filename, text in files.items():
        (root / name / filename).write_text(textwrap.dedent(text).lstrip())


class Project:
    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.database_url = database_url
        (root / "settings.py").write_text(SETTINGS)
        write_app(root, "accounts", ACCOUNTS)
        write_app(root, "audit", AUDIT)

    def environment(self, database_url: str | None = None, **env: str) -> dict[str, str]:
        return {
            **os.environ,
            **env,
            "DATABASE_URL": database_url or self.database_url,
            "DJANGO_SETTINGS_MODULE": "settings",
            "PYTHONPATH": os.pathsep.join([str(self.root), str(ROOT)]),
        }

    def run(self, *args: str, database_url: str | None = None, **env: str):
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=self.root,
            env=self.environment(database_url, **env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, *args: str, **kwargs) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def migration(self, app: str, name: str) -> Path:
        (path,) = (self.root / app / "migrations").glob(f"{name}*.py")
        return path


@pytest.fixture
def empty_databases():
    """``empty_databases()`` creates a new empty database on the test session's server and
    returns its URL; all are dropped after the test."""
    server_url = os.environ["DATABASE_URL"]
    names: list[str] = []

    def create() -> str:
        name = f"order_{uuid.uuid4().hex[:12]}"
        execute(server_url, f'CREATE DATABASE "{name}"')
        names.append(name)
        return urlparse(server_url)._replace(path=f"/{name}").geturl()

    yield create
    for name in names:
        execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        execute(server_url, f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')


def execute(url: str, sql: str) -> list:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@pytest.fixture
def project(tmp_path, empty_databases) -> Project:
    """The project with the migrations ``makemigrations`` writes for it, and a data migration
    in each app that creates a row (through the app's trigger) right after its tables."""
    project = Project(tmp_path, empty_databases())
    project.ok("makemigrations", "accounts", "audit")
    for app, model, field in (("accounts", "Account", "name"), ("audit", "Entry", "text")):
        initial = project.migration(app, "0001").stem
        (tmp_path / app / "data.py").write_text(DATA.format(app=app, model=model, field=field))
        (tmp_path / app / "migrations" / "0002_data.py").write_text(data_migration(app, initial))
    return project


def test_makemigrations_makes_trigger_migrations_depend_on_pgpubsub(project):
    for app in ("accounts", "audit"):
        text = project.migration(app, "0001").read_text()
        assert "pgtrigger.migrations.AddTrigger" in text
        assert "('pgpubsub', '0" in text or '("pgpubsub", "0' in text, text


def test_an_app_sorting_before_pgpubsub_migrates_an_empty_database(project):
    """``accounts`` < ``pgpubsub``: without the dependency, its data migration ran before
    pgpubsub's migrations and failed in the trigger (function pgpubsub_store does not exist)."""
    project.ok("migrate")
    stored = execute(
        project.database_url, "SELECT channel, payload->>'model' FROM pgpubsub_notification"
    )
    assert [model for _, model in stored] == ["Account"]


def test_a_plain_channel_trigger_migration_written_without_the_dependency_still_migrates(project):
    """A migration written before makemigrations added the dependency (by an earlier version,
    or by hand): the publishing functions exist before any migration runs."""
    path = project.migration("audit", "0001")
    text = path.read_text()
    without = "\n".join(
        line for line in text.splitlines() if "'pgpubsub'" not in line and '"pgpubsub"' not in line
    )
    assert without != text
    path.write_text(without)
    project.ok("migrate")
    rows = execute(project.database_url, "SELECT count(*) FROM audit_entry")
    assert rows == [(1,)]


def test_squashed_migrations_keep_the_order(project, empty_databases):
    project.ok("squashmigrations", "accounts", "0002", "--noinput")
    squashed = next((project.root / "accounts" / "migrations").glob("*squashed*.py"))
    for migration in ("0001_initial", "0002_data"):
        (project.root / "accounts" / "migrations" / f"{migration}.py").unlink()
    text = squashed.read_text().replace("replaces = ", "_replaced = ")
    squashed.write_text(text)
    database_url = empty_databases()
    project.ok("migrate", database_url=database_url)
    stored = execute(database_url, "SELECT payload->>'model' FROM pgpubsub_notification")
    assert stored == [("Account",)]


def test_the_row_a_data_migration_stored_is_processed_by_listen(project, tmp_path):
    """Migrate, then run: ``listen --recover`` processes what the data migration stored."""
    project.ok("migrate")
    welcomed = tmp_path / "welcomed.txt"
    listener = subprocess.Popen(
        [sys.executable, "-m", "django", "listen", "--recover"],
        cwd=project.root,
        env={**project.environment(), "WELCOMED": str(welcomed)},
        stdout=(log := (tmp_path / "listen.log").open("w")),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: welcomed.exists() and welcomed.read_text() == "from a data migration\n",
            60,
            "the listener to welcome the account the data migration created",
        )
        # The listener wrote the file before its transaction, which deletes the row, commits.
        wait_for(
            lambda: (
                execute(project.database_url, "SELECT count(*) FROM pgpubsub_notification")
                == [(0,)]
            ),
            30,
            "the processed row to be deleted",
        )
    finally:
        listener.send_signal(signal.SIGTERM)
        try:
            listener.wait(timeout=30)
        finally:
            listener.kill()
            log.close()
    assert listener.returncode == 0, (tmp_path / "listen.log").read_text()


def test_a_test_database_built_without_migrations_has_working_triggers(project):
    """As pytest-django --no-migrations builds it: tables from the models, triggers installed by
    pgtrigger after migrate, no django_migrations table (a lockable trigger's store failed in
    the db_version trigger, which looked the table up)."""
    output = project.ok("test", "accounts", "--noinput", NO_MIGRATIONS="1")
    assert "Ran 1 test" in output and "OK" in output, output
