import os

from django.http import HttpResponse

from benchapp.models import Event


def ping(request):
    """The page workload 28 requests while it measures serving web workers: one query, as a
    small page would make, and the pid of the worker that served it."""
    return HttpResponse(f"{os.getpid()} {Event.objects.count()}", content_type="text/plain")
