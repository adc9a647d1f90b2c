"""Views of the test project that acceptance tests request from real servers."""

import os

from django.http import HttpRequest, HttpResponse


def fork_report(request: HttpRequest) -> HttpResponse:
    """Fork this process (as a view or a callback using multiprocessing may) and answer whether
    the child got a Runtime of its own."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and vanishes
        from pgpubsub import embedded

        os.write(write, f"runtime={embedded.runtime() is not None}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    os.waitpid(child, 0)
    return HttpResponse(report, content_type="text/plain")
