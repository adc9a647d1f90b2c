from django.apps import AppConfig


class BenchAppConfig(AppConfig):
    name = "benchapp"
    default_auto_field = "django.db.models.AutoField"

    def ready(self):
        from benchapp import listeners  # noqa: F401  (registers the listeners and triggers)
