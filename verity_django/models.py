"""The one table verity_django keeps: replay positions under DatabaseStorage
(see ``positions.py``; RedisStorage keeps them as Redis keys instead)."""

from __future__ import annotations

from django.db import models


class ReplayPosition(models.Model):
    """Where one client's stream of one audience stood, and until when that is worth knowing."""

    # positions.key(): owner tag (32) + ":" + audience (at most 100).
    key = models.CharField(max_length=140, primary_key=True)
    # positions.encode(): the connection that owns the record, then its checkpoints.
    record = models.CharField(max_length=1000)
    expires = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "replay position"

    def __str__(self) -> str:
        return self.key
