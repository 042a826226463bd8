"""The OpenAPI schema drf-spectacular generates for the demo: valid OpenAPI
3, with the directive union on mutation responses, the read side's shapes
and the events endpoint."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("drf_spectacular")

from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

from verity_django import directives as d

REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    # The demo's schema: the suite's own ROOT_URLCONF serves tests.testapp.
    generator = SchemaGenerator(urlconf="testproject.urls")
    generated: dict[str, Any] = generator.get_schema(request=None, public=True)
    validate_schema(generated)
    return generated


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].removeprefix(REF)]
    return node


def test_directive_union(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    union = components["VerityDirective"]
    assert union["discriminator"]["propertyName"] == "op"
    assert set(union["discriminator"]["mapping"]) == set(d.OPS)
    assert components["VerityDirectiveOp"]["enum"] == list(d.OPS)
    item = components["VerityRefreshItem"]
    assert item["required"] == ["op", "name", "id"]
    assert {"level", "result", "idempotency_key", "source"} <= set(item["properties"])
    collection = components["VerityRefreshCollection"]["properties"]
    assert collection["params_mode"]["enum"] == list(d.PARAMS_MODES)


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/api/todos/", "post", "201"),
        ("/api/todos/{id}/", "patch", "200"),
        ("/api/todos/{id}/", "put", "200"),
        ("/api/todos/{id}/", "delete", "200"),
    ],
)
def test_mutations_document_directives(
    schema: dict[str, Any], path: str, method: str, status: str
) -> None:
    operation = schema["paths"][path][method]
    body = operation["responses"][status]["content"]["application/json"]["schema"]
    parts = body.get("allOf", [body])
    directives = [
        p["properties"]["directives"] for p in parts if "directives" in p.get("properties", {})
    ]
    assert directives == [directives[0]]
    assert directives[0]["items"] == {"$ref": f"{REF}VerityDirective"}
    assert "X-Verity-Directive-Request" in {p["name"] for p in operation["parameters"]}


def test_reads_are_not_documented_as_carrying_directives(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/api/todos/{id}/"]["get"]["responses"]["200"]
    assert "directives" not in str(body)


def test_list_documents_collection_bulk_and_rule_params(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/api/todos/"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"ids", "level", "status", "project"}
    assert params["status"]["schema"]["enum"] == ["active", "done"]
    assert params["level"]["schema"]["enum"] == ["expanded", "simplified"]
    shapes = resolve(schema, operation["responses"]["200"]["content"]["application/json"]["schema"])
    options = [resolve(schema, o) for o in shapes["oneOf"]]
    collection = options[0]
    assert collection["properties"]["ids"] == {"type": "array", "items": {"type": "integer"}}
    assert set(collection["required"]) == {"ids", "count"}
    assert [o["type"] for o in options[1:]] == ["array"] * 3


def test_retrieve_documents_each_level(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/api/todos/{id}/"]["get"]
    assert "level" in {p["name"] for p in operation["parameters"]}
    at_level = resolve(
        schema, operation["responses"]["200"]["content"]["application/json"]["schema"]
    )
    fields = [set(resolve(schema, o)["properties"]) for o in at_level["oneOf"]]
    assert fields[0] == {"id", "title", "status"}
    assert fields[2] >= {"description", "created_at", "updated_at", "project"}


def test_events_endpoint(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/api/events"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"client_id", "audience"}
    assert "text/event-stream" in operation["responses"]["200"]["content"]
