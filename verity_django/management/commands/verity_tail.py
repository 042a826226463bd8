from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from verity_django import envelopes
from verity_django.audiences import GLOBAL, InvalidAudience, channel_for, validate_audience
from verity_django.storage import configured


class Command(BaseCommand):
    help = "Print envelopes as they are published, from any process (reads the event storage)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--audience",
            action="append",
            dest="audiences",
            metavar="AUDIENCE",
            help=f"Audience to follow; repeat for several (default: {GLOBAL}).",
        )
        parser.add_argument(
            "--since",
            type=int,
            default=None,
            metavar="SEQ",
            help="Also print stored envelopes after this seq (default: only new ones).",
        )
        parser.add_argument(
            "--count", type=int, default=None, help="Stop after printing this many envelopes."
        )
        parser.add_argument(
            "--timeout", type=float, default=None, help="Stop after this many seconds."
        )
        parser.add_argument("--interval", type=float, default=0.25, help="Seconds between polls.")

    def handle(self, *args: Any, **options: Any) -> None:
        audiences = options["audiences"] or [GLOBAL]
        try:
            channels = {channel_for(validate_audience(a)): a for a in audiences}
        except InvalidAudience as exc:
            raise CommandError(str(exc)) from None
        store = configured()
        current = store.get_current_ids(channels)
        since = options["since"]
        positions = {c: current[c] if since is None else min(since, current[c]) for c in channels}
        self.stderr.write(
            "Following " + ", ".join(f"{a} (after seq {positions[c]})" for c, a in channels.items())
        )
        printed = 0
        deadline = None if options["timeout"] is None else time.monotonic() + options["timeout"]
        try:
            while deadline is None or time.monotonic() < deadline:
                for channel, audience in channels.items():
                    events, skipped_to = _events_after(store, channel, positions[channel])
                    if skipped_to is not None:
                        self.stderr.write(
                            f"{audience}: seqs {positions[channel] + 1} to {skipped_to} are no "
                            "longer stored; following on from there"
                        )
                        positions[channel] = skipped_to
                    for event in events:
                        self.stdout.write(envelopes.public(event.data))
                        self.stdout.flush()
                        positions[channel] = int(event.id)
                        printed += 1
                        if options["count"] is not None and printed >= options["count"]:
                            return
                time.sleep(options["interval"])
        except KeyboardInterrupt:
            return


def _events_after(store: Any, channel: str, position: int) -> tuple[list[Any], int | None]:
    """Events after ``position``, and where to go on from when they are gone."""
    from django_eventstream.storage import EventDoesNotExist

    try:
        return list(store.get_events(channel, position)), None
    except EventDoesNotExist as exc:
        return [], int(exc.current_id)
