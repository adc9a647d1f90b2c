"""Settings of pgpubsub's own test suite (and of the subprocesses its tests start)."""

import os

from pgpubsub.testing.postgres import database_url, django_database

SECRET_KEY = "pgpubsub-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.postgres",  # testapp.Document uses an ArrayField (Django 6 checks for this)
    "pgtrigger",
    "pgpubsub",
    "tests.testapp",
]
DATABASES = {"default": django_database(database_url())}
# A test database per test run, so runs against one shared server never collide.
DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
# A second database on the same server, for channels that name a database of their own.
DATABASES["other"] = {
    **DATABASES["default"],
    "TEST": {"NAME": f"test_{DATABASES['default']['NAME']}_other_{os.getpid()}"},
}
# The same database through a connection of its own: what a listener writes there commits
# whatever its own transaction does (tests/testapp/listeners.py: run_chaos_job).
# Its sessions are named apart, so that fault-injection tests can leave them alone.
DATABASES["side"] = {
    **DATABASES["default"],
    "OPTIONS": {
        **DATABASES["default"]["OPTIONS"],
        "application_name": f"{DATABASES['default']['OPTIONS'].get('application_name', '')}-side",
    },
    "TEST": {"MIRROR": "default"},
}
# The database "other" through an alias of its own, as a direct connection beside a pooled
# "other" would be (PGPUBSUB_LISTEN_ALIASES; tests/test_databases.py). Its sessions are named apart.
DATABASES["other_listen"] = {
    **DATABASES["other"],
    "OPTIONS": {
        **DATABASES["default"]["OPTIONS"],
        "application_name": f"{DATABASES['default']['OPTIONS'].get('application_name', '')}-other-listen",
    },
    "TEST": {"MIRROR": "other"},
}
# Tests of listeners with persistent connections set this in the environment of a subprocess.
if os.environ.get("PGPUBSUB_TEST_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["PGPUBSUB_TEST_CONN_MAX_AGE"])
# ... and this one to LISTEN through an alias of its own (as behind a transaction-pooling PgBouncer).
if os.environ.get("PGPUBSUB_TEST_LISTEN_ALIAS"):
    _listen = {**DATABASES["default"], "OPTIONS": dict(DATABASES["default"]["OPTIONS"])}
    _listen["OPTIONS"]["application_name"] = os.environ["PGPUBSUB_TEST_LISTEN_ALIAS"]
    _listen["PORT"] = os.environ.get("PGPUBSUB_TEST_LISTEN_PORT", _listen["PORT"])
    DATABASES["listen"] = _listen
    PGPUBSUB_DATABASE = "listen"
# Embedded-mode acceptance tests configure the Runtime of the servers they start this way.
PGPUBSUB_EMBEDDED = os.environ.get("PGPUBSUB_TEST_EMBEDDED") == "1"
for _name in ("WORKERS", "QUEUE_SIZE"):
    if os.environ.get(f"PGPUBSUB_TEST_{_name}"):
        globals()[f"PGPUBSUB_{_name}"] = int(os.environ[f"PGPUBSUB_TEST_{_name}"])
if os.environ.get("PGPUBSUB_TEST_CHANNELS"):
    PGPUBSUB_CHANNELS = os.environ["PGPUBSUB_TEST_CHANNELS"].split(",")
if os.environ.get("PGPUBSUB_TEST_LISTENER_FILTER"):
    PGPUBSUB_LISTENER_FILTER = os.environ["PGPUBSUB_TEST_LISTENER_FILTER"]
for _name in ("SHUTDOWN_TIMEOUT", "SWEEP_INTERVAL"):
    if os.environ.get(f"PGPUBSUB_TEST_{_name}"):
        globals()[f"PGPUBSUB_{_name}"] = float(os.environ[f"PGPUBSUB_TEST_{_name}"])
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "tests.urls"
WSGI_APPLICATION = "tests.wsgi.application"
ASGI_APPLICATION = "tests.asgi_router.application"
# What the admin needs (tests/test_admin.py drives it over HTTP).
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"pgpubsub": {"level": "WARNING"}},
}
# A project whose LOGGING gives the pgpubsub logger a handler of its own (listen must not add one).
if os.environ.get("PGPUBSUB_TEST_LOG_HANDLER"):
    LOGGING["formatters"] = {"project": {"format": "project: %(message)s"}}
    LOGGING["handlers"] = {"project": {"class": "logging.StreamHandler", "formatter": "project"}}
    LOGGING["loggers"]["pgpubsub"]["handlers"] = ["project"]
# Django's tasks framework (django.tasks on Django 6, the django-tasks backport before) on
# pgpubsub: tests/test_tasks*.py and tests/testapp/tasks.py.
TASKS = {
    "default": {
        "BACKEND": "pgpubsub.tasks.DatabaseBackend",
        "QUEUES": ["default", "emails", "reports"],
        "OPTIONS": {"RETRY": {"max_attempts": 3, "retry_delay": 0.2, "max_delay": 0.5}},
    }
}
