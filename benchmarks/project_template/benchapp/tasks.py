"""The benchmark's task (workloads 39-41): it does nothing, so that what is measured is what the
backend costs per task: storing it, claiming it, running it, writing its result."""

try:
    from django.tasks import task
except ImportError:  # Django < 6.0: the django-tasks backport
    from django_tasks import task


@task()
def noop(n):
    return None
