from django.contrib import admin
from django.urls import include, path
from django.views import defaults

from chat import views
from chat.api import json_errors_under_api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("chat.urls")),
]

handler400 = json_errors_under_api(defaults.bad_request, 400, "bad_request", "The request is malformed.")
handler403 = json_errors_under_api(defaults.permission_denied, 403, "forbidden", "You may not do that.")
handler404 = json_errors_under_api(defaults.page_not_found, 404, "not_found", "There is nothing here.")
handler500 = json_errors_under_api(defaults.server_error, 500, "server_error", "Something went wrong on the server.")
