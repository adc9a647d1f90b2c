import os

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from blog.models import Author, Post
from blog.tasks import send_welcome_email
from pgpubsub import embedded
from pgpubsub.views import can_see_details


def index(request: HttpRequest) -> HttpResponse:
    authors = Author.objects.prefetch_related("posts").order_by("pk")
    return render(request, "blog/index.html", {"authors": authors, "pid": os.getpid()})


@require_POST
def create_author(request: HttpRequest) -> HttpResponse:
    name = request.POST.get("name", "").strip()
    if name:
        with transaction.atomic():
            # The insert fires the author trigger (a listener writes the welcome post), and the
            # welcome email task is stored in the same transaction: both run once it commits,
            # neither if it rolls back.
            author = Author.objects.create(name=name)
            send_welcome_email.enqueue(author.pk)
    return redirect("index")


def read_post(request: HttpRequest, post_id: int) -> HttpResponse:
    try:
        post = Post.fetch(post_id)  # sends PostReads; a listener counts the read
    except Post.DoesNotExist:
        return HttpResponse("No such post", status=404)
    return render(request, "blog/post.html", {"post": post})


@never_cache
@require_GET
def pgpubsub_status(request: HttpRequest) -> JsonResponse:
    """What the pgpubsub Runtime inside this web process is doing (counters, never a payload);
    503 when this process runs none.

    Its channels, pid and last error (whose text is whatever a listener's exception said) are
    for staff, requests with PGPUBSUB_HEALTH_TOKEN, and, while DEBUG is on, requests from
    INTERNAL_IPS (the demo's); anyone else learns whether it runs and listens.
    """
    runtime = embedded.runtime()
    status = runtime.status() if runtime is not None else {"pid": os.getpid(), "running": False}
    internal = settings.DEBUG and request.META.get("REMOTE_ADDR") in settings.INTERNAL_IPS
    if not (internal or can_see_details(request)):
        status = {"running": status["running"], "connected": status.get("connected", False)}
    return JsonResponse(status, status=200 if runtime is not None else 503)
