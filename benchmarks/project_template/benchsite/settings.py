"""Settings of the benchmark project. The runner passes the database through BENCH_DB_* variables."""

import json
import os
from importlib.util import find_spec

SECRET_KEY = "pgpubsub-benchmarks"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "pgtrigger",
    "pgpubsub",
    "benchapp",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("BENCH_DB_NAME", "postgres"),
        "USER": os.environ.get("BENCH_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("BENCH_DB_PASSWORD", ""),
        "HOST": os.environ.get("BENCH_DB_HOST", ""),
        "PORT": os.environ.get("BENCH_DB_PORT", ""),
        "OPTIONS": json.loads(os.environ.get("BENCH_DB_OPTIONS") or "{}"),
        # Django's default (0: a connection per request) unless BENCH_CONN_MAX_AGE says otherwise.
        "CONN_MAX_AGE": json.loads(os.environ.get("BENCH_CONN_MAX_AGE") or "0"),
    }
}
# The embedded workloads (gunicorn) turn the Runtime on; django-pgpubsub 1.3.1 has no such
# settings and ignores them.
PGPUBSUB_EMBEDDED = os.environ.get("BENCH_EMBEDDED") == "1"
if os.environ.get("BENCH_PGPUBSUB_WORKERS"):
    PGPUBSUB_WORKERS = int(os.environ["BENCH_PGPUBSUB_WORKERS"])
# Issue 15's workloads: per-write NOTIFY (baked into the SQL functions by ``migrate``) and the
# worker threads' idle connection timeout.
if os.environ.get("BENCH_NOTIFY_ON_WRITE"):
    PGPUBSUB_NOTIFY_ON_WRITE = os.environ["BENCH_NOTIFY_ON_WRITE"] == "1"
if os.environ.get("BENCH_WATCH_INTERVAL"):  # from the runner's environment, for experiments
    PGPUBSUB_WATCH_INTERVAL = float(os.environ["BENCH_WATCH_INTERVAL"])
if os.environ.get("BENCH_IDLE_CONNECTION_TIMEOUT"):
    PGPUBSUB_IDLE_CONNECTION_TIMEOUT = float(os.environ["BENCH_IDLE_CONNECTION_TIMEOUT"])
# Django's tasks framework (benchmarks/tasks.py, workloads 39-41), where one is importable
# (django.tasks, or the django-tasks backport): pgpubsub's backend, or django-tasks-db's
# (BENCH_TASKS_BACKEND=db, in the venv the runner makes for it, with this checkout's pgpubsub
# too). django-pgpubsub 1.3.1's venv has neither, and no TASKS.
if find_spec("django_tasks_db"):
    INSTALLED_APPS.append("django_tasks_db")
if os.environ.get("BENCH_TASKS_BACKEND") == "db":
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
elif find_spec("django.tasks") or find_spec("django_tasks"):
    TASKS = {"default": {"BACKEND": "pgpubsub.tasks.DatabaseBackend", "QUEUES": ["default"]}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "benchsite.urls"
MIDDLEWARE = []
