from django.contrib import admin
from django.urls import path

from pgpubsub.views import health
from tests.views import fork_report

urlpatterns = [
    path("admin/", admin.site.urls),
    path("pgpubsub/health/", health),
    path("fork/", fork_report),
]
