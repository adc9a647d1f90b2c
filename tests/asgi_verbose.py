"""The test project's ASGI application, with pgpubsub's INFO messages on stderr (the test
settings keep them quiet): shutdown tests read what each process's Runtime says."""

import logging

from tests.asgi import application

__all__ = ["application"]

_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("%(levelname)s [%(process)d] %(name)s: %(message)s"))
logging.getLogger("pgpubsub").addHandler(_handler)
logging.getLogger("pgpubsub").setLevel(logging.INFO)
