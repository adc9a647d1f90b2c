"""The WSGI application of the benchmark project: gunicorn serves it in the embedded workloads
(``PGPUBSUB_EMBEDDED`` on through ``BENCH_EMBEDDED=1``), where each worker runs a Runtime."""

import os
from pathlib import Path

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
application = get_wsgi_application()

# Workload 28 waits until every web worker has loaded the application: each leaves a file
# named after its pid in BENCH_READY_DIR.
if os.environ.get("BENCH_READY_DIR"):
    Path(os.environ["BENCH_READY_DIR"], str(os.getpid())).touch()
