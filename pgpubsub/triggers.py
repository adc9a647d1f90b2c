"""pgtrigger triggers that publish a model's row changes to a channel."""

from __future__ import annotations

import re

import pgtrigger
from django.db import models

_SAFE_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Notify(pgtrigger.Trigger):
    """Sends ``{"app", "model", "old", "new", "context", "when"}`` to ``channel`` (default:
    ``name``); ``when`` is ``BEFORE`` or ``AFTER``."""

    def __init__(self, *, channel: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.channel = channel or self.name
        if not _SAFE_CHANNEL.match(self.channel):
            raise ValueError(
                f"Channel {self.channel!r} must be a lower-case identifier of at most 63 "
                "characters (a channel's listen_safe_name())."
            )

    def get_declare(self, model: type[models.Model]) -> list[tuple[str, str]]:
        return [("payload", "jsonb"), ("notification_context_text", "text")]

    def get_func(self, model: type[models.Model]) -> str:
        return f"""
            notification_context_text := current_setting('pgpubsub.notification_context', true);
            payload := jsonb_build_object(
                'app', {_literal(model._meta.app_label)},
                'model', {_literal(model.__name__)},
                'old', to_jsonb(OLD),
                'new', to_jsonb(NEW),
                'context', COALESCE(NULLIF(notification_context_text, '')::jsonb, '{{}}'::jsonb),
                'when', TG_WHEN
            );
            {self._publish()}
            RETURN COALESCE(NEW, OLD);
        """

    def _publish(self) -> str:
        return f"PERFORM pgpubsub_notify({_literal(self.channel)}, payload::text);"


class LockableNotify(Notify):
    """Stores the message in ``pgpubsub_notification`` and sends the row's id."""

    def _publish(self) -> str:
        return f"PERFORM pgpubsub_store({_literal(self.channel)}, payload);"
