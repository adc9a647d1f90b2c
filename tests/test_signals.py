"""message_processed / message_failed: what metrics receivers get."""

import pytest

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from pgpubsub.signals import message_failed, message_processed
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sent():
    """(signal name, keyword arguments) of each signal sent, while the test runs."""
    events = []

    def processed(sender, **kwargs):
        events.append(("processed", {"sender": sender, **kwargs}))

    def failed(sender, **kwargs):
        events.append(("failed", {"sender": sender, **kwargs}))

    message_processed.connect(processed)
    message_failed.connect(failed)
    yield events
    message_processed.disconnect(processed)
    message_failed.disconnect(failed)


def test_processed_and_failed_messages_are_signalled(listening, sent):
    pgpubsub.notify(channels.Job, key="fine", text="ok")
    pgpubsub.notify(channels.FailingJob, key="broken")
    pgpubsub.notify(channels.Message, key="plain")
    with pytest.raises(RuntimeError):
        process_notifications(listening)

    assert [(name, kwargs["sender"]) for name, kwargs in sent] == [
        ("processed", channels.Job),
        ("failed", channels.FailingJob),
        ("processed", channels.Message),
    ]
    job, failure, plain = (kwargs for _, kwargs in sent)
    assert job["channel"] is channels.Job
    assert (
        isinstance(job["row_id"], int)
        and not Notification.objects.filter(pk=job["row_id"]).exists()
    )
    assert failure["row_id"] == Notification.objects.get().pk  # still stored
    assert isinstance(failure["error"], RuntimeError)
    assert plain["row_id"] is None
    assert all(0 <= kwargs["duration"] < 10 for _, kwargs in sent)


def test_a_failing_receiver_does_not_disturb_processing(listening, caplog):
    def broken(sender, **kwargs):
        raise ValueError("metrics backend down")

    message_processed.connect(broken)
    try:
        pgpubsub.notify(channels.Job, key="still-done", text="ok")
        process_notifications(listening)
    finally:
        message_processed.disconnect(broken)
    assert Effect.objects.filter(key="still-done").exists()
    assert not Notification.objects.exists()
    assert "A receiver of a pgpubsub signal failed" in caplog.text
