from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from verity_django import directives as d
from verity_django.audiences import GLOBAL, InvalidAudience, validate_audience
from verity_django.management.commands._publish import publish_to


class Command(BaseCommand):
    help = "Make every client of the given audiences reload the page (deploys, emergencies)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--audience",
            action="append",
            dest="audiences",
            metavar="AUDIENCE",
            help=f"Audience to reload; repeat for several (default: {GLOBAL}).",
        )
        parser.add_argument("--hard", action="store_true", help="Ask for a cache-bypassing reload.")
        parser.add_argument(
            "--idempotency-key",
            help="Clients apply a key once; without one a new key is generated and printed.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        audiences = options["audiences"] or [GLOBAL]
        for audience in audiences:
            try:
                validate_audience(audience)
            except InvalidAudience as exc:
                raise CommandError(str(exc)) from None
        key = options["idempotency_key"]
        if key is None:
            key = f"force-reload-{d.new_idempotency_key()}"
        try:
            directive = d.force_reload_page(
                hard=options["hard"], idempotency_key=key, timestamp=d.now_ms()
            )
        except d.InvalidDirective as exc:
            raise CommandError(str(exc)) from None
        publish_to(self, audiences, [directive])
