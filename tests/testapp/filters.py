"""A ``PGPUBSUB_LISTENER_FILTER`` provider for tests: only rows whose key does not start with
"skip" may be claimed."""

from django.db.models import Q


class SkipMarkedRows:
    def get_filter(self) -> Q:
        return ~Q(payload__kwargs__key__startswith="skip")
