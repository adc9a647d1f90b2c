"""The package builds as an sdist and a wheel (the wheel built from the sdist), and the wheel
installs and works on its own."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def only(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_package_and_nothing_else(dist):
    names = set(zipfile.ZipFile(only(dist, "*.whl")).namelist())
    for required in [
        "pgpubsub/py.typed",
        "pgpubsub/admin.py",
        "pgpubsub/management/commands/listen.py",
        "pgpubsub/migrations/0001_initial.py",
        "pgpubsub/migrations/0006_payload_stores_proper_jsonb.py",
        "pgpubsub/migrations/0007_functions_and_channel_index.py",
        "pgpubsub/testing/pytest_plugin.py",
        "pgpubsub/templates/admin/pgpubsub/notification/delete_selected_notifications.html",
    ]:
        assert required in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"pgpubsub"}


@pytest.mark.timeout(300)
def test_the_sdist_holds_the_whole_project(dist):
    names = tarfile.open(only(dist, "*.tar.gz")).getnames()
    files = {name.split("/", 1)[1] for name in names if "/" in name}
    for required in [
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "docs/index.md",
        "tests/conftest.py",
        "tests/testapp/migrations/0001_initial.py",
        "tests/fixtures/django_pgpubsub_1_3_1.sql",
        "example/manage.py",
        "benchmarks/__main__.py",
    ]:
        assert required in files
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.timeout(300)
def test_the_installed_wheel_imports_and_passes_django_s_checks(dist, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(only(dist, "*.whl"))],
        check=True,
        capture_output=True,
        timeout=120,
    )
    script = """
import django, pgpubsub
from django.conf import settings
assert pgpubsub.__file__.startswith(TARGET), pgpubsub.__file__
settings.configure(
    INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth",
        "django.contrib.contenttypes", "django.contrib.sessions",
        "django.contrib.messages", "pgtrigger", "pgpubsub"],
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "unused"}},
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True, "OPTIONS": {"context_processors": [
            "django.template.context_processors.request",
            "django.contrib.auth.context_processors.auth",
            "django.contrib.messages.context_processors.messages"]}}],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware"],
)
django.setup()
from django.core.management import call_command, get_commands
assert get_commands()["listen"] == "pgpubsub"
call_command("check", fail_level="WARNING")
import pgpubsub.admin, pgpubsub.listen, pgpubsub.testing.listeners
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-c", script.replace("TARGET", repr(str(target)))],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["System check identified no issues (0 silenced).", "ok"]


#: The name on the package index: ``pgpubsub`` there is an unrelated project of 2015.
DISTRIBUTION = "pgpubsub-django"


def test_the_distribution_is_not_the_unrelated_pgpubsub_of_the_package_index():
    with open(ROOT / "pyproject.toml", "rb") as file:
        assert tomllib.load(file)["project"]["name"] == DISTRIBUTION


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_distribution_name(dist):
    wheel = only(dist, "*.whl")
    assert wheel.name.startswith(DISTRIBUTION.replace("-", "_") + "-")
    metadata = next(
        name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".dist-info/METADATA")
    )
    headers = zipfile.ZipFile(wheel).read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert f"Name: {DISTRIBUTION}" in headers


def test_every_install_line_of_the_docs_names_the_distribution():
    """``pip install <name>`` in the README and docs installs this project, never the
    unrelated ``pgpubsub`` of the package index (installs of a checkout, ``-e .``, aside)."""
    pages = [
        ROOT / "README.md",
        ROOT / "example" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    wrong = []
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for requirement in re.findall(
                r"pip install ((?:-\S+ )*['\"]?[A-Za-z][\w.\-\[\],]*)", line
            ):
                name = re.split(r"[\[=<>]", requirement.split()[-1].strip("'\""))[0]
                if name.lower().replace("_", "-") == "pgpubsub":
                    wrong.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not wrong, "\n".join(wrong)
