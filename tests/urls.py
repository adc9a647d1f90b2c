from django.contrib import admin
from django.urls import path

from pgpubsub.views import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("pgpubsub/health/", health),
]
