"""Every code sample of README.md and docs/*.md is exercised; a new sample that is not fails
``test_every_block_is_accounted_for``.

- ``python`` blocks run for real, in a subprocess (this module run with ``python -m``) set up as a
  reader's project: a copy of example/ (``exampleproject.settings``, the ``blog`` app) against a
  database of its own on the test session's server. A document's blocks run in order, in one
  namespace, as a reader follows the page:

  - a block whose first line names a file (``# blog/channels.py``) is that file of the project:
    it is written there before Django starts (README's quick start thus replaces the example's
    channels and listeners), imported in its turn, its names join the page's and the TestCases
    it defines are run;
  - a ``# settings.py`` block is a settings fragment: it runs in a namespace of its own, the apps
    it lists must be installed and its other settings must pass pgpubsub's system checks;
  - a block that uses ``self`` is the body of a test method: it runs in a Django ``TestCase``;
  - any other block runs in the page's namespace.

  GIVEN provides the names a sample takes for granted; THEN checks what a block did.
- ``sh`` blocks: each ``python manage.py <command>`` must be a command of the project whose
  options parse; ``makemigrations`` and ``migrate`` are run, ``listen`` LISTENs (as the command
  does) and processes, at the end of the page, what the page published. The other commands (venv,
  pip, pytest) must be what .ci/run runs, and ``example/manage.py`` commands what
  tests/test_example.py runs (pip is not run here).
- Any other block: NOT_CODE says why it is no code, COVERED_ELSEWHERE which test runs it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import linecache
import re
import shlex
import shutil
import subprocess
import sys
import traceback
import types
import unittest
import warnings
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from tests import test_example

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    "README.md",
    *sorted(path.relative_to(ROOT).as_posix() for path in ROOT.glob("docs/*.md")),
]
SHELL_LANGUAGES = {"sh", "bash"}
#: Management commands the samples' shell blocks are run with; the others are parsed only.
RUN_COMMANDS = {"makemigrations", "migrate"}
#: Seconds the subprocess that runs the samples may take (it takes a few).
HARNESS_TIMEOUT = 90

# Blocks that are not code, by (document, index of the block in the document).
NOT_CODE = {
    ("docs/architecture.md", 0): "a diagram of the data path",
    (
        "docs/operations.md",
        3,
    ): "output of `pgpubsub status`, whose format tests/test_status.py checks",
    (
        "docs/operations.md",
        6,
    ): "an answer of the health view with its details, which tests/test_health_view.py checks",
}

# Python blocks that another test runs as written: (test file, how it finds the block, why).
COVERED_ELSEWHERE = {
    ("docs/testing.md", 1): (
        "tests/test_testing_helpers.py",
        "verbatim",
        "the conftest.py line; that test module enables the plugin with it",
    ),
    ("docs/testing.md", 2): (
        "tests/test_testing_helpers.py",
        "doc_example",
        "a pytest test: test_docs_pytest_example runs it with the pgpubsub_listeners fixture",
    ),
}

# What a sample takes for granted, run before it (in a module of its own); its names are given
# to the sample.
GIVEN = {
    ("docs/settings.md", 0): """
from django.conf import settings

database = dict(settings.DATABASES["default"])  # the reader's database entry
""",
    ("docs/testing.md", 3): """
from dataclasses import dataclass
from types import SimpleNamespace

import pgpubsub
from pgpubsub.models import Notification


@dataclass
class ChargeCard(pgpubsub.Channel):  # a lockable channel whose listener fails
    order_id: int
    lock_notifications = True


@pgpubsub.listener(ChargeCard)
def charge(order_id: int) -> None:
    raise RuntimeError("card declined")


order = SimpleNamespace(pk=1)
""",
}

# Checks run after a sample, in its namespace.
THEN = {
    ("docs/testing.md", 4): """
assert Post.objects.filter(author__name="Ann").count() == 1, "no welcome post: no listener ran"
""",
}


# --- the documents' blocks -------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
FILE_HEADER = re.compile(r"#\s*(?P<path>[\w./-]+\.py)(\s|$)")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    index: int  # among the fenced blocks of the document
    language: str
    code: str
    line: int  # of the opening fence

    @property
    def key(self) -> tuple[str, int]:
        return (self.doc, self.index)

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"

    @property
    def file(self) -> str | None:
        """The file of the reader's project the block is, when its first line names one."""
        match = FILE_HEADER.match(self.code.split("\n", 1)[0])
        return match["path"] if match else None

    @property
    def kind(self) -> str:
        """How a python block runs: settings, file, test method or page."""
        if self.file is not None:
            return "settings" if Path(self.file).name == "settings.py" else "file"
        try:
            tree = ast.parse(self.code)
        except SyntaxError:
            return "page"  # and running it reports the error
        return "test method" if _uses_self(tree) else "page"

    def describe(self) -> str:
        code = "".join(f"    | {line}\n" for line in self.code.splitlines())
        return f"{self.doc}, line {self.line} (block {self.index}, {self.language}):\n{code}"


def _uses_self(tree: ast.Module) -> bool:
    """True when code outside function and class bodies uses the name ``self``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Name) and node.id == "self":
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def parse_blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    number = 0
    while number < len(lines):
        match = FENCE.match(lines[number])
        number += 1
        if not match:
            continue
        start, fence, indent = number, match["fence"], len(match["indent"])
        body = []
        while number < len(lines) and not re.fullmatch(
            rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[number]
        ):
            body.append(lines[number][indent:])
            number += 1
        if number == len(lines):
            raise ValueError(f"{doc}, line {start}: the code block is not closed")
        number += 1
        info = match["info"].strip()
        language = info.split()[0].lower() if info else ""
        blocks.append(Block(doc, len(blocks), language, "\n".join(body) + "\n", start))
    return blocks


BLOCKS = {block.key: block for doc in DOCUMENTS for block in parse_blocks(doc)}
PYTHON_BLOCKS = [block for block in BLOCKS.values() if block.language == "python"]
SHELL_BLOCKS = [block for block in BLOCKS.values() if block.language in SHELL_LANGUAGES]
#: The blocks the subprocess runs.
RUN_BLOCKS = [
    block
    for block in BLOCKS.values()
    if block.language in SHELL_LANGUAGES
    or (block.language == "python" and block.key not in COVERED_ELSEWHERE)
]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell sample, each as its argv (``a && b`` are two)."""
    commands = []
    for line in code.splitlines():
        command: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token in {"|", "||", "&", ";", ">", ">>", "<"}:
                raise ValueError(f"{line!r}: {token!r} is not understood by tests/test_docs.py")
            if token != "&&":
                command.append(token)
            elif command:
                commands.append(command)
                command = []
    return commands


def manage_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """(manage.py script, command, its arguments) of ``python manage.py <command> ...``."""
    if len(argv) >= 2 and argv[0] in ("python", "python3") and Path(argv[1]).name == "manage.py":
        if len(argv) == 2:
            raise ValueError(f"{shlex.join(argv)}: no command")
        return argv[1], argv[2], argv[3:]
    return None


# --- the subprocess that runs the samples ----------------------------------------------------


@dataclass
class Page:
    """What a reader of one document has at hand: the names of its samples so far, and the
    LISTENing connection a ``manage.py listen`` sample started."""

    namespace: dict[str, Any]
    listening: Any = None
    listen_block: str | None = None
    results: dict[str, dict] = field(default_factory=dict)


def main(project: Path, report_path: Path) -> None:
    report: dict[str, Any] = {"setup": None, "blocks": {}}
    try:
        build_project(project)
        sys.path.insert(0, str(project))
        import django
        from django.core.management import call_command
        from django.test.utils import setup_test_environment

        django.setup()
        setup_test_environment()  # what a test run sets up (the test client's host, ...)
        call_command("migrate", interactive=False, verbosity=0)
    except Exception:
        report["setup"] = traceback.format_exc()
    else:
        for doc in DOCUMENTS:
            report["blocks"].update(run_document(doc, project))
    report_path.write_text(json.dumps(report))


def build_project(project: Path) -> None:
    """A copy of example/ with each block that names its file written to that file."""
    shutil.copytree(ROOT / "example", project, ignore=shutil.ignore_patterns("__pycache__"))
    written: dict[str, Block] = {}
    for block in PYTHON_BLOCKS:
        if block.kind != "file" or block.key in COVERED_ELSEWHERE:
            continue
        if block.file in written and written[block.file].code != block.code:
            raise AssertionError(
                f"{block.id} and {written[block.file].id} are both {block.file}, and differ"
            )
        written[block.file] = block
        target = project / block.file
        for directory in reversed(target.relative_to(project).parents[:-1]):
            if not (project / directory).exists():
                (project / directory).mkdir()
                (project / directory / "__init__.py").touch()
        target.write_text(block.code)


def run_document(doc: str, project: Path) -> dict[str, dict]:
    from django.db import connection

    from pgpubsub.listen import process_notifications

    page = Page(new_module("docs_page_", doc.removesuffix(".md")).__dict__)
    failed = None
    for block in BLOCKS.values():
        if block.doc != doc or block not in RUN_BLOCKS:
            continue
        if failed is not None:
            page.results[block.id] = {"ok": False, "error": f"Not run: {failed} failed."}
            continue
        try:
            if block.language == "python":
                run_python(block, page)
            else:
                run_shell(block, page, project)
        except Exception:
            page.results[block.id] = {"ok": False, "error": traceback.format_exc()}
            failed = block.id
        else:
            page.results[block.id] = {"ok": True}
    # The end of the page: the listener it started processes what the page published.
    if page.listening is not None:
        try:
            process_notifications(page.listening)
        except Exception:
            page.results[page.listen_block] = {
                "ok": False,
                "error": "A listener failed on what the page published:\n" + traceback.format_exc(),
            }
        finally:
            stop_listening(page)
    connection.close()  # the next page starts on a new session
    return page.results


def new_module(prefix: str, name: str) -> types.ModuleType:
    """An empty module in ``sys.modules`` (a channel's name is its module's name)."""
    module = types.ModuleType(prefix + re.sub(r"\W", "_", name).lower())
    sys.modules[module.__name__] = module
    return module


def compiled(code: str, name: str) -> types.CodeType:
    filename = f"<{name}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks
    return compile(code, filename, "exec")


def given(block: Block) -> dict[str, Any]:
    if block.key not in GIVEN:
        return {}
    module = new_module("docs_given_", block.id)
    exec(compiled(GIVEN[block.key], f"GIVEN for {block.id}"), module.__dict__)
    return public_names(module)


def public_names(module: types.ModuleType) -> dict[str, Any]:
    return {name: value for name, value in vars(module).items() if not name.startswith("_")}


def run_python(block: Block, page: Page) -> None:
    code = compiled(block.code, block.id)
    then = compiled(THEN[block.key], f"THEN for {block.id}") if block.key in THEN else None
    if block.kind == "settings":
        run_settings(code, given(block), then)
    elif block.kind == "file":
        module = importlib.import_module(block.file.removesuffix(".py").replace("/", "."))
        page.namespace.update(public_names(module))
        if then:
            exec(then, page.namespace)
        run_tests(
            unittest.defaultTestLoader.loadTestsFromTestCase(value)
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, unittest.TestCase)
            and value.__module__ == module.__name__
        )
    elif block.kind == "test method":
        run_in_test_case(code, {**page.namespace, **given(block)}, then)
    else:
        page.namespace.update(given(block))
        exec(code, page.namespace)
        if then:
            exec(then, page.namespace)


def run_settings(code: types.CodeType, names: dict[str, Any], then: Any) -> None:
    from django.conf import settings
    from django.core.checks import run_checks
    from django.test import override_settings

    scope = dict(names)
    exec(code, scope)
    if then:
        exec(then, scope)
    values = {name: value for name, value in scope.items() if name.isupper()}
    assert values, "This settings fragment sets no setting."
    apps = values.pop("INSTALLED_APPS", None)
    if apps is not None:
        missing = [
            app for app in apps if app is not Ellipsis and app not in settings.INSTALLED_APPS
        ]
        assert not missing, f"Not in the example project's INSTALLED_APPS: {missing}"
    if values:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Django warns that overriding DATABASES is unusual
            with override_settings(**values):
                messages = run_checks(tags=["pgpubsub"])
        assert not messages, f"pgpubsub's system checks on these settings: {messages}"


def run_in_test_case(code: types.CodeType, namespace: dict[str, Any], then: Any) -> None:
    from django.test import TestCase

    class SampleTest(TestCase):
        def runTest(self) -> None:
            scope = {**namespace, "self": self}
            exec(code, scope)
            if then:
                exec(then, scope)

    run_tests([SampleTest()])


def run_tests(tests: Any) -> None:
    suite = unittest.TestSuite(tests)
    result = unittest.TestResult()
    suite.run(result)
    problems = result.errors + result.failures + [(test, "skipped") for test, _ in result.skipped]
    assert not problems, "\n".join(f"{test}:\n{text}" for test, text in problems)
    assert result.testsRun == suite.countTestCases()


def run_shell(block: Block, page: Page, project: Path) -> None:
    from django.core.management import call_command, get_commands, load_command_class

    for argv in shell_commands(block.code):
        manage = manage_command(argv)
        if manage is None:
            continue  # venv, pip, pytest: test_shell_commands_are_what_ci_runs
        script, name, args = manage
        app = get_commands().get(name)
        assert app is not None, f"{shlex.join(argv)}: the project has no command {name!r}"
        command = load_command_class(app, name)
        if name in RUN_COMMANDS:
            if name == "makemigrations":
                no_migrations_outside(project)
            out, err = StringIO(), StringIO()
            # As from the command line: with the system checks, without questions.
            call_command(
                command, *args, interactive=False, skip_checks=False, stdout=out, stderr=err
            )
            assert not err.getvalue(), f"{shlex.join(argv)} said:\n{err.getvalue()}"
            continue
        options = command.create_parser(script, name).parse_args(args)
        if name == "listen":
            start_listening(options.channels, block, page)


def no_migrations_outside(project: Path) -> None:
    """``makemigrations`` may only write into the reader's project, never into the repository."""
    from django.apps import apps
    from django.core.management import call_command

    outside = [
        config.label
        for config in apps.get_app_configs()
        if not Path(config.path).resolve().is_relative_to(project.resolve())
    ]
    try:
        call_command(
            "makemigrations", *outside, check_changes=True, dry_run=True, stdout=StringIO()
        )
    except SystemExit:
        raise AssertionError(f"Models of {outside} have changes that no migration holds") from None


def start_listening(channels: list[str] | None, block: Block, page: Page) -> None:
    """What ``manage.py listen`` does first: LISTEN (one listener per page: a new one takes
    over from the one before, once that has processed what it got)."""
    from pgpubsub.channel import locate_channel
    from pgpubsub.listen import listen_to_channels, process_notifications

    for channel in channels or []:
        locate_channel(channel)
    if page.listening is not None:
        try:
            process_notifications(page.listening)
        finally:
            stop_listening(page)
    page.listening = listen_to_channels(channels)
    page.listen_block = block.id


def stop_listening(page: Page) -> None:
    from django.db import connection

    page.listening.stop()
    page.listening = None
    with connection.cursor() as cursor:
        cursor.execute("UNLISTEN *")


# --- the tests -------------------------------------------------------------------------------

# The database the samples run against, on the test session's server (dropped afterwards).
example_database_url = test_example.example_database_url


def test_every_block_is_accounted_for():
    problems = [
        f"{block.describe()}  neither python nor sh: add it to NOT_CODE with the reason"
        for block in BLOCKS.values()
        if block.language != "python"
        and block.language not in SHELL_LANGUAGES
        and block.key not in NOT_CODE
    ]
    for table, languages in (
        (NOT_CODE, None),
        (COVERED_ELSEWHERE, {"python"}),
        (GIVEN, {"python"}),
        (THEN, {"python"}),
    ):
        for key in table:
            block = BLOCKS.get(key)
            if block is None:
                problems.append(f"{key}: no such block (the documents changed?)")
            elif languages is not None and block.language not in languages:
                problems.append(f"{key}: a {block.language or 'plain'} block")
            elif languages is None and block.language in {"python", *SHELL_LANGUAGES}:
                problems.append(f"{key}: a {block.language} block is code")
    for key in GIVEN.keys() & COVERED_ELSEWHERE.keys() | THEN.keys() & COVERED_ELSEWHERE.keys():
        problems.append(f"{key}: GIVEN or THEN for a block that another test runs")
    for key in GIVEN.keys() & BLOCKS.keys():
        if BLOCKS[key].kind == "file":
            problems.append(f"{key}: GIVEN for a file of the project (it imports what it needs)")
    assert not problems, "\n".join(problems)
    assert PYTHON_BLOCKS and SHELL_BLOCKS  # the parser found them


@pytest.mark.parametrize("key", sorted(COVERED_ELSEWHERE), ids=lambda key: f"{key[0]}#{key[1]}")
def test_sample_is_run_by_another_test(key):
    block = BLOCKS[key]
    test_file, how, _why = COVERED_ELSEWHERE[key]
    source = (ROOT / test_file).read_text()
    if how == "doc_example":  # tests/test_testing_helpers.py's doc_example(first line)
        assert f'"docs" / "{Path(block.doc).name}"' in source
        assert f'doc_example("{block.code.splitlines()[0]}")' in source, block.describe()
    else:
        assert how == "verbatim"
        lines = [
            line for line in block.code.splitlines() if line.strip() and not FILE_HEADER.match(line)
        ]
        assert lines, block.describe()
        for line in lines:
            assert line in source, f"{line!r} is not in {test_file}\n{block.describe()}"


def ci_commands() -> list[list[str]]:
    """The commands .ci/run runs, as argv normalised like the samples' (see ``normalized``)."""
    commands = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        try:
            commands.extend(normalized(argv) for argv in shell_commands(line))
        except ValueError:  # shell syntax no sample uses (loops, pipes, ...)
            continue
    return commands


def normalized(argv: list[str]) -> list[str]:
    """Without the environment set in front (``VAR=x``, ``env -u VAR``) or pip's ``-q``, and
    ``python -m pip`` as ``pip``: CI runs the README's commands with these differences only."""
    argv = list(argv)
    while argv:
        if re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
            del argv[0]
        elif argv[0] == "env":
            del argv[0]
            while argv[:1] == ["-u"]:
                del argv[:2]
        else:
            break
    if argv[1:3] == ["-m", "pip"] and argv[0] in ("python", "python3"):
        argv = ["pip", *argv[3:]]
    return [arg for arg in argv if arg != "-q"]


def extras() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["optional-dependencies"]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda block: block.id)
def test_shell_commands_are_what_ci_runs(block):
    """The set-up commands are those .ci/run runs, in the same order (so the README's cannot
    drift); a ``pip install`` of other extras installs nothing the ``test`` extra CI installs
    lacks; ``example/manage.py`` commands are those tests/test_example.py runs. ``manage.py``
    commands are run by test_samples_run_in_the_example_project."""
    ci = ci_commands()
    position = -1
    for argv in shell_commands(block.code):
        manage = manage_command(argv)
        if manage is not None:
            script, name, _ = manage
            if script != "manage.py":  # the repository's example, not the reader's project
                assert test_example.MANAGE == ROOT / script, block.describe()
                assert f'str(MANAGE), "{name}"' in inspect.getsource(test_example), (
                    f"tests/test_example.py does not run {shlex.join(argv)}\n{block.describe()}"
                )
            continue
        command = normalized(argv)
        if command in ci[position + 1 :]:
            position = ci.index(command, position + 1)
            continue
        assert command[:3] == ["pip", "install", "-e"] and len(command) == 4, (
            f"{shlex.join(argv)}: not run by .ci/run (in this order)\n{block.describe()}"
        )
        match = re.fullmatch(r"\.\[([\w,-]+)\]", command[3])
        assert match, f"{shlex.join(argv)}: not an install of this checkout\n{block.describe()}"
        known = extras()
        for extra in match[1].split(","):
            assert extra in known, f"pyproject.toml has no extra {extra!r}\n{block.describe()}"
            missing = set(known[extra]) - set(known["test"])
            assert not missing, f"CI (.[test]) does not install {missing}\n{block.describe()}"


@pytest.mark.timeout(HARNESS_TIMEOUT + 30)
def test_samples_run_in_the_example_project(example_database_url, tmp_path):
    report_path = tmp_path / "report.json"
    env = {
        **test_example.demo_env(example_database_url),
        "DJANGO_SETTINGS_MODULE": "exampleproject.settings",
    }
    process = subprocess.run(
        [sys.executable, "-m", "tests.test_docs", str(tmp_path / "project"), str(report_path)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT,
    )
    output = f"exit code {process.returncode}\n--- stdout ---\n{process.stdout}\n--- stderr ---\n{process.stderr}"
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    files = "".join(
        f"\n  {block.file}: {block.id}"
        for block in PYTHON_BLOCKS
        if block.kind == "file" and block.key not in COVERED_ELSEWHERE
    )
    assert report["setup"] is None, (
        f"{report['setup']}\nFiles written from samples:{files}\n{output}"
    )
    failures = []
    for block in RUN_BLOCKS:
        result = report["blocks"].get(block.id)
        if result is None:
            failures.append(f"{block.describe()}  was not run")
        elif not result["ok"]:
            failures.append(f"{block.describe()}{result['error']}")
    assert not failures, "\n\n".join(failures) + f"\n\n{output}"
    assert process.returncode == 0, output


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))


def test_the_docs_build_without_warnings(tmp_path):
    """``mkdocs build --strict`` (mkdocs.yml turns broken links and anchors into warnings)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "delivery" / "index.html").exists()
