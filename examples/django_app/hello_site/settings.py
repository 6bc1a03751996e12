"""The smallest Django project that serves the example: no database, no apps, no templates."""

from __future__ import annotations

import os

# Django's own key (sessions, CSRF). The cohort cookie is signed with CANARY_KEY instead
# (see wsgi.py): each has a salt of its own, so one never verifies as the other.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-only-change-me")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "hello_site.urls"
WSGI_APPLICATION = "hello_site.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
