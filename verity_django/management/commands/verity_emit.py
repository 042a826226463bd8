from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from verity_django import directives as d
from verity_django.audiences import GLOBAL, InvalidAudience, validate_audience
from verity_django.management.commands._publish import publish_to


class Command(BaseCommand):
    help = (
        "Publish directives given as JSON (one object or a list), validated like the "
        'library\'s own, e.g. \'{"op": "refresh_collection", "name": "todos"}\'. '
        "Use '-' to read the JSON from standard input."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("json", help="A directive or a list of directives, as JSON, or '-'.")
        parser.add_argument(
            "--audience",
            action="append",
            dest="audiences",
            metavar="AUDIENCE",
            help=f"Audience to publish to; repeat for several (default: {GLOBAL}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        text = sys.stdin.read() if options["json"] == "-" else options["json"]
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"Not valid JSON: {exc}") from None
        raw = data if isinstance(data, list) else [data]
        if not raw:
            raise CommandError("Give at least one directive.")
        items = []
        for index, item in enumerate(raw):
            try:
                directive = d.Directive.from_dict(item)
            except d.InvalidDirective as exc:
                where = f"directive {index}: " if len(raw) > 1 else ""
                raise CommandError(f"Invalid {where}{exc}") from None
            changes: dict[str, Any] = {}
            if directive.idempotency_key is None:
                changes["idempotency_key"] = d.new_idempotency_key()
            if directive.timestamp is None:
                changes["timestamp"] = d.now_ms()
            items.append(directive.with_metadata(**changes))
        audiences = options["audiences"] or [GLOBAL]
        for audience in audiences:
            try:
                validate_audience(audience)
            except InvalidAudience as exc:
                raise CommandError(str(exc)) from None
        publish_to(self, audiences, items)
