"""A ``PGPUBSUB_LISTENER_FILTER`` provider for tests: only rows whose key does not start with
"skip" may be claimed."""

from django.db.models import Q
from django.db.models.expressions import RawSQL


class SkipMarkedRows:
    def get_filter(self) -> Q:
        return ~Q(payload__kwargs__key__startswith="skip")


class MissingTable:
    """A filter whose subquery names a table that does not exist: the project's error (an
    undefined table, as a database not migrated gives), not pgpubsub's."""

    def get_filter(self) -> Q:
        return Q(pk__in=RawSQL("SELECT id FROM pgpubsub_test_no_such_table", []))
