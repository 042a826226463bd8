"""View mixins for the endpoints a Verity client reads.

- ``CollectionMixin.list`` answers ``{"ids": [...], "count": N}``, filtered by
  the params of the model's ``RefreshCollection`` rules, or, with
  ``?ids=1,2,3``, the items themselves for the client's ``bulkFetch``.
- ``LevelsMixin`` serves ``?level=`` with the serializers of a
  :class:`~verity_django.contrib.rest_framework.levels.Levels`.
- ``DirectivesMixin`` opts a view into directive injection when
  ``INJECT_DRF_RESPONSES`` is off.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from rest_framework.exceptions import ValidationError
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.settings import api_settings

from verity_django.contrib.rest_framework.filters import RuleParamsFilter
from verity_django.contrib.rest_framework.levels import Levels, UnknownLevel
from verity_django.rules import to_json_value

# Actions that read an item at a level; writes keep the view's serializer.
_LEVEL_ACTIONS = frozenset({"retrieve", "list"})


class DirectivesMixin:
    """Opt a DRF view into directive injection."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        response.verity_inject = True  # type: ignore[attr-defined]
        return response


class LevelsMixin(GenericAPIView[Any]):
    """Serve ``?level=<name>`` on reads with the serializers of ``levels``."""

    levels: Levels | None = None
    level_param = "level"

    def get_level(self) -> str | None:
        """The requested level (None is the default); an unknown one is a 400."""
        if self.levels is None:
            if self.request.query_params.get(self.level_param):
                raise ValidationError({self.level_param: ["This endpoint has no levels."]})
            return None
        try:
            return self.levels.parse(self.request.query_params.get(self.level_param))
        except UnknownLevel as exc:
            raise ValidationError({self.level_param: [str(exc)]}) from exc

    def get_serializer_class(self) -> type[BaseSerializer[Any]]:
        if getattr(self, "action", None) in _LEVEL_ACTIONS:
            level = self.get_level()
            if self.levels is not None:
                return self.levels.serializer_class(level)
        return super().get_serializer_class()


class CollectionMixin(GenericAPIView[Any]):
    """``list`` as a Verity collection, or as a bulk fetch with ``?ids=``.

    ``collection`` names the ``RefreshCollection`` rules whose params filter
    the list (by default the model's only collection name). ids keep the
    JSON type that ``refresh_item.id`` has. They are ordered by the
    queryset's ordering (the view's ``get_queryset()``, else the model's
    ``Meta.ordering``) with the primary key as the last tie-breaker, so equal
    data always lists in the same order.
    """

    collection: str | None = None
    filter_backends = [RuleParamsFilter]
    bulk_param = "ids"
    bulk_max = 100

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        self._reject_unknown_params(request)
        if self.bulk_param in request.query_params:
            return self.bulk_fetch(request)
        queryset = stable_order(self.filter_queryset(self.get_queryset()))
        ids = [to_json_value(pk) for pk in queryset.values_list("pk", flat=True)]
        return Response({"ids": ids, "count": len(ids)})

    def bulk_fetch(self, request: Request) -> Response:
        """The items named by ``?ids=`` that the user may see, in the order asked."""
        queryset = self.get_queryset()
        pk_field = queryset.model._meta.pk
        assert pk_field is not None
        raw = [part for part in request.query_params[self.bulk_param].split(",") if part.strip()]
        if len(raw) > self.bulk_max:
            raise ValidationError(
                {self.bulk_param: [f"Ask for at most {self.bulk_max} ids at once, not {len(raw)}."]}
            )
        try:
            wanted = list(dict.fromkeys(pk_field.to_python(part.strip()) for part in raw))
        except DjangoValidationError as exc:
            raise ValidationError({self.bulk_param: list(exc.messages)}) from exc
        found = {obj.pk: obj for obj in queryset.filter(pk__in=wanted)}
        items = [found[pk] for pk in wanted if pk in found]
        return Response(self.get_serializer(items, many=True).data)

    def known_params(self) -> set[str]:
        """Query params ``list`` accepts: the filter backends' own, and ours."""
        known = self._read_params()
        for backend_class in self.filter_backends:
            backend: Any = backend_class()
            filterset_class = getattr(backend, "get_filterset_class", None)
            if filterset_class is not None:
                known.update(filterset_class(self, self.get_queryset()).base_filters)
            else:
                known.update(p["name"] for p in backend.get_schema_operation_parameters(self))
        return known

    def _read_params(self) -> set[str]:
        """Params that choose what to read rather than filter the collection."""
        names = (
            self.bulk_param,
            getattr(self, "level_param", None),
            api_settings.URL_FORMAT_OVERRIDE,
        )
        return {name for name in names if name}

    def _reject_unknown_params(self, request: Request) -> None:
        known = self.known_params()
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise ValidationError({p: [f"Unknown query parameter. Use: {valid}."] for p in unknown})
        if self.bulk_param in request.query_params:
            filters = sorted(set(request.query_params) - self._read_params())
            if filters:
                raise ValidationError(
                    {p: [f"Cannot be combined with {self.bulk_param}."] for p in filters}
                )


def stable_order(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """``queryset`` in its own order, then by primary key."""
    if queryset.query.order_by:
        ordering = list(queryset.query.order_by)
    elif queryset.query.default_ordering:
        ordering = list(queryset.model._meta.ordering)
    else:
        ordering = []
    return queryset.order_by(*ordering, "pk")


if importlib.util.find_spec("drf_spectacular") is not None:
    # Registers the schema extension for these mixins.
    from verity_django.contrib.rest_framework import schema  # noqa: F401
