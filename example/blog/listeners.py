"""Listeners. With ``PGPUBSUB_EMBEDDED = True`` (the example's settings) they run inside the web
server's processes, on the worker threads of pgpubsub's Runtime; ``manage.py listen`` runs them
in a process of its own."""

import logging
import os

from django.db.models import F

import pgpubsub
from blog.channels import AuthorTriggerChannel, PostReads
from blog.models import Author, Post

logger = logging.getLogger(__name__)

#: The models whose reads PostReads counts, by the ``model_type`` a message names.
READ_COUNTED = {"post": Post}


@pgpubsub.post_insert_listener(AuthorTriggerChannel)
def write_welcome_post(old: Author | None, new: Author) -> None:
    Post.objects.create(
        author_id=new.pk,
        title=f"Welcome {new.name}",
        content=f"{new.name} has joined the blog. This post was written by a pgpubsub listener "
        f"in process {os.getpid()}.",
    )
    logger.info("Wrote the welcome post of author %s (%r)", new.pk, new.name)


@pgpubsub.listener(PostReads)
def count_read(model_id: int, model_type: str) -> None:
    model = READ_COUNTED.get(model_type)
    if model is None:
        logger.warning("PostReads: no read counter for model type %r", model_type)
        return
    model.objects.filter(pk=model_id).update(read_count=F("read_count") + 1)
    logger.info("Counted a read of %s %s", model_type, model_id)
