from django.urls import path

from chat import views

urlpatterns = [
    path("", views.room_list, name="room-list"),
    path("rooms/new/", views.room_create, name="room-create"),
    path("rooms/<slug:slug>/", views.room_detail, name="room-detail"),
    path("rooms/<slug:slug>/members/", views.member_add, name="member-add"),
    path("rooms/<slug:slug>/members/<str:username>/remove/", views.member_remove, name="member-remove"),
]
