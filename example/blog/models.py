from __future__ import annotations

from django.db import models

import pgpubsub


class Author(models.Model):
    name = models.TextField()
    joined = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Post(models.Model):
    author = models.ForeignKey(Author, null=True, on_delete=models.SET_NULL, related_name="posts")
    title = models.TextField()
    content = models.TextField(default="")
    date = models.DateTimeField(auto_now_add=True)
    # Kept up to date by the PostReads listener, not by the code that reads the post.
    read_count = models.IntegerField(default=0)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return self.title

    @classmethod
    def fetch(cls, post_id: int) -> Post:
        """The post, and a PostReads message so that a listener counts the read."""
        from blog.channels import PostReads

        post = cls.objects.get(pk=post_id)
        pgpubsub.notify(PostReads, model_id=post.pk, model_type="post")
        return post
