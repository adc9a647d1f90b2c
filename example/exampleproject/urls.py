from blog import views
from django.urls import path

urlpatterns = [
    path("", views.index, name="index"),
    path("authors/", views.create_author, name="create-author"),
    path("posts/<int:post_id>/", views.read_post, name="read-post"),
]
