"""The demo project with an AUTHORIZE hook that queries the database on every
check, as a team-membership hook does (the README's team example)."""

from __future__ import annotations

from typing import Any

from testproject.settings import *  # noqa: F403
from testproject.settings import VERITY

VERITY = {**VERITY, "AUTHORIZE": "tests.live.db_authorize_settings.authorize"}


def authorize(user: Any, audience: str) -> bool:
    from django.contrib.auth import get_user_model

    from verity_django.audiences import default_authorize

    pk = getattr(user, "pk", None)
    known = pk is not None and get_user_model().objects.filter(pk=pk).exists()
    return default_authorize(user, audience) and (known or audience == "global")
