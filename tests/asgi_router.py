"""An ASGI module that sets Django up itself before it builds its application, as projects with
an ASGI router (websockets beside HTTP) often do; settings name it in ASGI_APPLICATION."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
