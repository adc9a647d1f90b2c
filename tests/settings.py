"""Settings of pgpubsub's own test suite (and of the subprocesses its tests start)."""

import os

from pgpubsub.testing.postgres import database_url, django_database

SECRET_KEY = "pgpubsub-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "pgtrigger",
    "pgpubsub",
    "tests.testapp",
]
DATABASES = {"default": django_database(database_url())}
# A test database per test run, so runs against one shared server never collide.
DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
# Tests of listeners with persistent connections set this in the environment of a subprocess.
if os.environ.get("PGPUBSUB_TEST_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["PGPUBSUB_TEST_CONN_MAX_AGE"])
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "tests.urls"
MIDDLEWARE = []
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"pgpubsub": {"level": "WARNING"}},
}
