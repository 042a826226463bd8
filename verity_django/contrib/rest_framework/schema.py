"""OpenAPI with drf-spectacular: the read side's shapes, the directives on
mutation responses, and the events endpoint.

Importing this module registers a view extension for the Verity mixins (the
mixins import it when drf-spectacular is installed). The rest is one
postprocessing hook, :func:`add_directives`, which a project lists in
``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``: every view's responses
may gain ``directives`` through the middleware, so the hook documents them
on every mutation, and the events endpoint is not a DRF view at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db import models
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import (
    OpenApiParameter,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import serializers

from verity_django import directives as d
from verity_django.conf import conf
from verity_django.pull import REQUEST_HEADER, REQUEST_VALUE

_MUTATIONS = ("post", "put", "patch", "delete")
_REF = "#/components/schemas/"


def _id_field(model: type[models.Model]) -> serializers.Field[Any, Any, Any, Any]:
    # ids are JSON numbers for integer keys, strings otherwise (to_json_value).
    pk = model._meta.pk
    if isinstance(pk, models.IntegerField | models.AutoField):
        return serializers.IntegerField()
    return serializers.CharField()


class VerityViewExtension(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    """Documents ``list`` as a collection or bulk fetch, and reads at a level."""

    target_class = "verity_django.contrib.rest_framework.mixins.CollectionMixin"
    match_subclasses = True

    def view_replacement(self) -> Any:
        view = self.target
        model = view.queryset.model if view.queryset is not None else None
        if model is None:
            return view
        levels = getattr(view, "levels", None)
        parameters = []
        if levels is not None:
            named = [n for n in levels.names if n is not None]
            parameters.append(
                OpenApiParameter(
                    view.level_param,
                    str,
                    enum=named,
                    description="The level to read; none is the default level. "
                    f"The maximal level is {levels.maximal!r}.",
                )
            )
        item_serializers = (
            [view.serializer_class]
            if levels is None
            else [levels.serializer_class(n) for n in levels.names]
        )

        def at_level(many: bool = False) -> Any:
            if len(item_serializers) == 1:
                return item_serializers[0](many=many)
            return PolymorphicProxySerializer(
                component_name=f"{model.__name__}AtLevel",
                serializers=item_serializers,
                resource_type_field_name=None,
                many=many,
            )

        collection = inline_serializer(
            name=f"{model.__name__}Collection",
            fields={
                "ids": serializers.ListField(child=_id_field(model)),
                "count": serializers.IntegerField(),
            },
        )
        bulk = OpenApiParameter(
            view.bulk_param,
            str,
            description=f"Comma-separated ids, at most {view.bulk_max}: answers those items "
            "(the ones the user may see, in the order asked) instead of the collection.",
        )
        list_schema = extend_schema(
            parameters=[bulk, *parameters],
            responses={
                200: PolymorphicProxySerializer(
                    component_name=f"{model.__name__}CollectionOrItems",
                    serializers=[collection, *(item(many=True) for item in item_serializers)],
                    resource_type_field_name=None,
                    many=False,
                )
            },
            description="The collection as `{ids, count}`, filtered by the params of the "
            "model's RefreshCollection rules and ordered by the queryset's ordering, then by "
            f"primary key. With `?{view.bulk_param}=` the items themselves.",
        )
        actions = {"list": list_schema}
        if levels is not None:
            actions["retrieve"] = extend_schema(parameters=parameters, responses={200: at_level()})
        return extend_schema_view(**actions)(view)


def add_directives(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: directives and the events endpoint."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(directive_components())
    directives = {
        "type": "array",
        "items": {"$ref": f"{_REF}VerityDirective"},
        "description": f"Present when the request sent `{REQUEST_HEADER}: {REQUEST_VALUE}`.",
    }
    header = {
        "name": REQUEST_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": [REQUEST_VALUE]},
        "description": "Ask for the directives this request causes in the response body.",
    }
    for path_item in result.get("paths", {}).values():
        for method in _MUTATIONS:
            operation = path_item.get(method)
            if operation is None:
                continue
            operation.setdefault("parameters", []).append(header)
            responses = operation.setdefault("responses", {})
            for status, response in list(responses.items()):
                if not str(status).startswith("2"):
                    continue
                content = response.get("content", {}).get("application/json")
                if content is not None and "schema" in content:
                    content["schema"] = {
                        "allOf": [
                            content["schema"],
                            {"type": "object", "properties": {"directives": directives}},
                        ]
                    }
            if "204" in responses and "200" not in responses:
                responses["200"] = {
                    "description": "No content, but directives were requested and caused.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"directives": directives},
                                "required": ["directives"],
                            }
                        }
                    },
                }
    for index, path in enumerate(events_paths(), start=1):
        result.setdefault("paths", {})[path] = events_operation(index)
    return result


def directive_components() -> dict[str, Any]:
    """One schema per op, and ``VerityDirective``: their union, keyed by ``op``."""
    metadata = {
        "idempotency_key": {"type": "string"},
        "timestamp": {"type": "integer", "description": "ms since the epoch"},
        "audience": {"type": "string"},
        "source": {"type": "string", "description": "the client id that caused it"},
        "seq": {"type": "integer"},
    }
    params = {"type": "object", "additionalProperties": True}
    fields: dict[str, dict[str, Any]] = {
        "refresh_collection": {
            "name": {"type": "string"},
            "params": params,
            "params_mode": {"type": "string", "enum": list(d.PARAMS_MODES)},
            "result": {"type": "object", "description": "`{ids, count}`, written as is"},
        },
        "refresh_item": {
            "name": {"type": "string"},
            "id": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "level": {"type": "string"},
            "result": {
                "type": "object",
                "description": '`{"levels": {...}}`, `{"level", "data", "ts"}` or '
                '`{"data", "ts"}`: the item\'s data, so the client need not refetch it',
            },
        },
        "invalidate": {"targets": {"type": "array", "items": {"$ref": f"{_REF}VerityDirective"}}},
        "force_reload_page": {"hard": {"type": "boolean"}},
    }
    required = {
        "refresh_collection": ["name"],
        "refresh_item": ["name", "id"],
        "invalidate": ["targets"],
        "force_reload_page": [],
    }
    components: dict[str, Any] = {"VerityDirectiveOp": {"type": "string", "enum": list(d.OPS)}}
    mapping = {}
    for op in d.OPS:
        component = "Verity" + "".join(part.title() for part in op.split("_"))
        mapping[op] = f"{_REF}{component}"
        components[component] = {
            "type": "object",
            "properties": {"op": {"type": "string", "enum": [op]}, **fields[op], **metadata},
            "required": ["op", *required[op]],
        }
    components["VerityDirective"] = {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "op", "mapping": mapping},
    }
    return components


def events_paths() -> list[str]:
    """Where the URLconf routes :func:`verity_django.views.events`."""
    from verity_django.views import events

    return sorted(
        {f"/{route}" for route, callback in _routes(get_resolver()) if callback is events}
    )


def _routes(resolver: URLResolver, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _routes(entry, route)
        elif isinstance(entry, URLPattern):
            yield route, entry.callback


def events_operation(index: int = 1) -> dict[str, Any]:
    query = [
        (conf.CLIENT_ID_PARAM, "The client's id: its own changes come back as empty envelopes."),
        (conf.AUDIENCE_PARAM, "An audience to read (repeatable); each one must be allowed."),
    ]
    return {
        "get": {
            "operationId": "verity_events" if index == 1 else f"verity_events_{index}",
            "summary": "Verity directives over Server-Sent Events",
            "tags": ["verity"],
            "parameters": [
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": text,
                }
                for name, text in query
            ],
            "responses": {
                "200": {
                    "description": "An SSE stream: a `hello` envelope per audience, then "
                    '`{"type": "directives", "seq", "audience", "directives": [...]}` envelopes '
                    "as unnamed events, and keep-alives.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "400": {"description": "Too many or invalid audiences."},
                "403": {"description": "An audience the user may not read."},
            },
        }
    }
