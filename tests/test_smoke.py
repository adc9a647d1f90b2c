import pytest

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Author, Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)


def test_plain_and_lockable(listening):
    pgpubsub.notify(channels.Message, key="a", text="it's $$ fine \\ ü")
    pgpubsub.notify(channels.Job, key="j1", text="x" * 20000)
    Author.objects.create(name="Ann")
    Post.objects.create(content="hello")
    process_notifications(listening)
    kinds = [kind for kind, _ in received]
    assert kinds.count("Message") == 1
    assert received[0][1]["text"] == "it's $$ fine \\ ü"
    assert Effect.objects.filter(key="j1").exists()
    assert Effect.objects.filter(channel="AuthorTrigger").count() == 1
    assert Notification.objects.count() == 0
    assert "PostTrigger" in kinds
