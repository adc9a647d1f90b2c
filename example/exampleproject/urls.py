from blog import views
from django.urls import path

from pgpubsub.views import health

urlpatterns = [
    path("", views.index, name="index"),
    path("authors/", views.create_author, name="create-author"),
    path("posts/<int:post_id>/", views.read_post, name="read-post"),
    # The Runtime of the process that answers (embedded mode), and the stored backlog.
    path("pgpubsub/status/", views.pgpubsub_status, name="pgpubsub-status"),
    path("pgpubsub/health/", health, name="pgpubsub-health"),
]
