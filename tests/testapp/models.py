import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models


class Author(models.Model):
    name = models.TextField()
    age = models.IntegerField(null=True)
    active = models.BooleanField(default=True)


class Post(models.Model):
    author = models.ForeignKey(Author, null=True, on_delete=models.SET_NULL)
    content = models.TextField(default="")
    date = models.DateTimeField(auto_now_add=True)
    read_count = models.IntegerField(default=0)


class Document(models.Model):
    """A row whose columns cover the types a trigger payload must carry faithfully."""

    title = models.TextField()
    body = models.TextField(default="")
    price = models.DecimalField(max_digits=20, decimal_places=6, null=True)
    ratio = models.FloatField(null=True)
    published = models.DateField(null=True)
    updated = models.DateTimeField(null=True)
    duration = models.DurationField(null=True)
    token = models.UUIDField(default=uuid.uuid4)
    data = models.JSONField(null=True)
    blob = models.BinaryField(null=True)
    tags = ArrayField(models.TextField(), default=list)
    renamed = models.TextField(db_column="renamed_column", default="")


class Parent(models.Model):
    label = models.TextField(default="")


class Child(Parent):
    toy = models.TextField(default="")


class Effect(models.Model):
    """What a listener did; the unique key makes any duplicate processing fail loudly."""

    key = models.TextField(unique=True)
    channel = models.TextField()
    value = models.TextField(default="")
    pid = models.IntegerField(null=True)


class Marker(models.Model):
    """Written outside the listener's transaction (through the ``side`` alias): survives the
    rollback of a failed attempt, so a listener can tell its first attempt from later ones."""

    key = models.TextField(unique=True)
