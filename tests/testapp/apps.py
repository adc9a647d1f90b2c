from django.apps import AppConfig


class TestappConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.AutoField"

    def ready(self):
        from tests.testapp import listeners  # noqa: F401 - registers the listeners
