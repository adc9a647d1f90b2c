"""The WSGI application of the benchmark project: gunicorn serves it in the embedded workloads
(``PGPUBSUB_EMBEDDED`` on through ``BENCH_EMBEDDED=1``), where each worker runs a Runtime."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
application = get_wsgi_application()
