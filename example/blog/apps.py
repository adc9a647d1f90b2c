from django.apps import AppConfig


class BlogConfig(AppConfig):
    name = "blog"

    def ready(self) -> None:
        # Registers the listeners, and with them the database triggers of trigger channels.
        from blog import listeners  # noqa: F401
