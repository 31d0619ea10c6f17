from django.urls import include, path, re_path

from chat import api, views

urlpatterns = [
    path("", views.room_list, name="room-list"),
    path("rooms/new/", views.room_create, name="room-create"),
    path("dm/<str:username>/", views.direct_room, name="direct-room"),
    path("rooms/<slug:slug>/", views.room_detail, name="room-detail"),
    path("rooms/<slug:slug>/patterns/", views.room_patterns, name="room-patterns"),
    path("rooms/<slug:slug>/members/", views.member_add, name="member-add"),
    path("rooms/<slug:slug>/members/<str:username>/remove/", views.member_remove, name="member-remove"),
    path("rooms/<slug:slug>/notify/", views.room_notify, name="room-notify"),
    path("mentions/", views.mentions, name="mentions"),
    path("search/", views.search, name="search"),
    # The slash keeps it apart from a file named "thumbnail" (a name never holds a slash).
    path("files/<str:key>/thumbnail/", views.attachment_thumbnail, name="attachment-thumbnail"),
    path("files/<str:key>/<path:name>", views.attachment, name="attachment"),
    path("settings/", views.notification_settings, name="settings"),
    path("unsubscribe/<str:token>/", views.unsubscribe, name="unsubscribe"),
    path("api/", include((api.urls(), "api"))),
    # Anything else under /api/ answers JSON too, never an HTML error page.
    re_path(r"^api/", api.not_found),
    path("healthz", api.healthz, name="healthz"),
]
