"""Collection filters derived from the model's ``RefreshCollection`` rules.

The query params a collection endpoint accepts are exactly the params its
directives name, so the two can never drift apart. With django-filter
installed the filters are a generated ``FilterSet`` (and drf-spectacular
documents them as it documents any); without it, each value is cleaned by
its model field. Either way a value of the wrong type is a 400 naming the
param, and every param narrows the collection with an exact match, which is
what the client's ``exact`` and ``contains`` params modes both refetch.
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import QuerySet
from rest_framework.exceptions import ValidationError
from rest_framework.filters import BaseFilterBackend
from rest_framework.request import Request
from rest_framework.views import APIView

from verity_django import registry
from verity_django.rules import RefreshCollection

try:
    from django_filters import FilterSet
    from django_filters.rest_framework import DjangoFilterBackend
except ImportError:  # pragma: no cover - exercised by the tests without django-filter
    FilterSet = None
    DjangoFilterBackend = None


def collection_names(model: type[models.Model]) -> list[str]:
    rules = registry.get(model)
    if rules is None:
        return []
    names = (b.rule.name for b in rules.rules if isinstance(b.rule, RefreshCollection))
    return list(dict.fromkeys(names))


def collection_params(model: type[models.Model], name: str | None) -> dict[str, str]:
    """``{param: field name}`` over every ``RefreshCollection`` rule of ``name``.

    ``name=None`` means the model's only collection.
    """
    names = collection_names(model)
    if name is None:
        if len(names) != 1:
            raise ImproperlyConfigured(
                f"{model._meta.label} has {len(names)} RefreshCollection names "
                f"({', '.join(names) or 'none'}): set `collection` on the view to one of them."
            )
        name = names[0]
    elif name not in names:
        raise ImproperlyConfigured(
            f"{model._meta.label} has no RefreshCollection rule named {name!r} "
            f"(it has: {', '.join(names) or 'none'})."
        )
    rules = registry.get(model)
    assert rules is not None
    params: dict[str, str] = {}
    for bound in rules.rules:
        if isinstance(bound.rule, RefreshCollection) and bound.rule.name == name:
            params.update(bound.rule.param_fields())
    return params


def filtered_field(
    model: type[models.Model], field_name: str
) -> tuple[str, models.Field[Any, Any]]:
    """The lookup name and the field whose type a param's value has.

    A foreign key is filtered on its column with the target's type: a param
    naming a deleted project is an empty collection, not an invalid choice.
    """
    field = model._meta.get_field(field_name)
    if isinstance(field, models.ForeignKey):
        return field.attname, field.target_field
    assert isinstance(field, models.Field)
    return field_name, field


def _collection_of(view: APIView) -> str | None:
    return getattr(view, "collection", None)


def _view_model(view: APIView) -> type[models.Model]:
    # The class attribute first: get_queryset() often reads request.user,
    # which a schema generator's request does not have.
    queryset = getattr(view, "queryset", None)
    if queryset is None:
        queryset = view.get_queryset()  # type: ignore[attr-defined]
    return queryset.model  # type: ignore[no-any-return]


class ModelFieldParamsFilter(BaseFilterBackend):
    """The rule params, each value cleaned by its model field (no django-filter)."""

    def filter_queryset(
        self, request: Request, queryset: QuerySet[Any], view: APIView
    ) -> QuerySet[Any]:
        lookups: dict[str, Any] = {}
        errors: dict[str, list[str]] = {}
        for param, field_name in collection_params(queryset.model, _collection_of(view)).items():
            raw = request.query_params.get(param)
            if raw is None or raw == "":
                continue
            lookup, field = filtered_field(queryset.model, field_name)
            try:
                lookups[lookup] = field.clean(raw, None)
            except DjangoValidationError as exc:
                errors[param] = list(exc.messages)
        if errors:
            raise ValidationError(errors)
        return queryset.filter(**lookups)

    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        params = collection_params(_view_model(view), _collection_of(view))
        return [
            {"name": param, "required": False, "in": "query", "schema": {"type": "string"}}
            for param in params
        ]


RuleParamsFilter: type[BaseFilterBackend] = ModelFieldParamsFilter

if DjangoFilterBackend is not None:

    @functools.cache
    def rule_filterset(model: type[models.Model], name: str | None) -> type[Any]:
        """A ``FilterSet`` with one exact filter per param of the collection's rules."""
        declared: dict[str, Any] = {}
        for param, field_name in collection_params(model, name).items():
            lookup, field = filtered_field(model, field_name)
            declared[param] = FilterSet.filter_for_field(field, lookup, "exact")
        meta = type("Meta", (), {"model": model, "fields": []})
        return type(
            f"{model.__name__}CollectionFilterSet", (FilterSet,), {**declared, "Meta": meta}
        )

    class FilterSetParamsFilter(DjangoFilterBackend):  # type: ignore[misc]
        """The rule params as a generated django-filter ``FilterSet``."""

        def get_filterset_class(self, view: APIView, queryset: Any = None) -> type[Any]:
            model = queryset.model if queryset is not None else _view_model(view)
            return rule_filterset(model, _collection_of(view))

    RuleParamsFilter = FilterSetParamsFilter
