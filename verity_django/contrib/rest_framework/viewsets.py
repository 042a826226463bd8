"""Viewsets that serve a Verity item type: its collection, bulk fetch and levels."""

from __future__ import annotations

from typing import Any

from rest_framework import viewsets

from verity_django.contrib.rest_framework.mixins import CollectionMixin, LevelsMixin


class VerityModelViewSet(CollectionMixin, LevelsMixin, viewsets.ModelViewSet[Any]):
    """A ``ModelViewSet`` whose ``list`` is a collection and whose reads take ``?level=``."""


class VerityReadOnlyModelViewSet(CollectionMixin, LevelsMixin, viewsets.ReadOnlyModelViewSet[Any]):
    """The read-only variant of :class:`VerityModelViewSet`."""
