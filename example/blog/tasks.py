import logging
import os

from django.template.loader import render_to_string

from blog.models import Author

try:
    from django.tasks import task
except ImportError:  # Django 4.2 and 5.2: the django-tasks backport
    from django_tasks import task

logger = logging.getLogger(__name__)


@task(queue_name="emails")
def send_welcome_email(author_id: int) -> str:
    """Write the new author's welcome email (to the log: the example sends no mail); return
    its subject, which the task's result keeps."""
    author = Author.objects.get(pk=author_id)
    subject = f"Welcome to the blog, {author.name}"
    body = render_to_string("blog/welcome_email.txt", {"author": author}).strip()
    logger.info(
        "Sent the welcome email of author %s in process %s: %r", author.pk, os.getpid(), body
    )
    return subject
