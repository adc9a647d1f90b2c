import os

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from blog.models import Author, Post
from pgpubsub import embedded


def index(request: HttpRequest) -> HttpResponse:
    authors = Author.objects.prefetch_related("posts").order_by("pk")
    return render(request, "blog/index.html", {"authors": authors, "pid": os.getpid()})


@require_POST
def create_author(request: HttpRequest) -> HttpResponse:
    name = request.POST.get("name", "").strip()
    if name:
        # The insert fires the author trigger; a listener writes the welcome post.
        Author.objects.create(name=name)
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
    503 when this process runs none."""
    runtime = embedded.runtime()
    if runtime is None:
        return JsonResponse({"pid": os.getpid(), "running": False}, status=503)
    return JsonResponse(runtime.status())
