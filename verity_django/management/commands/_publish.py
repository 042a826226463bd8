from __future__ import annotations

import json
from collections.abc import Sequence

from django.core.management.base import BaseCommand, CommandError

from verity_django import directives as d
from verity_django.publishing import publish_now


def publish_to(command: BaseCommand, audiences: Sequence[str], items: list[d.Directive]) -> None:
    """Publish now, in order after anything this process still holds, and
    report each seq (commands are not requests: they wait for it)."""
    payload = json.dumps([x.to_dict() for x in items])
    for audience in dict.fromkeys(audiences):
        try:
            published = publish_now(audience, items)
        except Exception as exc:
            raise CommandError(f"Could not publish to {audience!r}: {exc}") from exc
        command.stdout.write(f"Sent to audience {audience!r} with seq {published.seq}: {payload}")
