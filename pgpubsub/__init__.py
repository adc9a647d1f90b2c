"""pgpubsub: reliable asynchronous message processing for Django on PostgreSQL LISTEN/NOTIFY."""

from pgpubsub.channel import Channel, TriggerChannel, set_notification_context
from pgpubsub.listeners import (
    ListenerFilterProvider,
    listener,
    post_delete_listener,
    post_insert_listener,
    post_save_listener,
    post_update_listener,
    pre_delete_listener,
    pre_insert_listener,
    pre_save_listener,
    pre_update_listener,
    trigger_listener,
)
from pgpubsub.notify import notify, process_stored_notifications, retry_failed

__all__ = [
    "Channel",
    "ListenerFilterProvider",
    "TriggerChannel",
    "listener",
    "notify",
    "post_delete_listener",
    "post_insert_listener",
    "post_save_listener",
    "post_update_listener",
    "pre_delete_listener",
    "pre_insert_listener",
    "pre_save_listener",
    "pre_update_listener",
    "process_stored_notifications",
    "retry_failed",
    "set_notification_context",
    "trigger_listener",
]
