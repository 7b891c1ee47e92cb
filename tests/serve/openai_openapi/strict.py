"""OpenAI's OpenAPI document, read strictly, as JSON Schema validators for the gateway's answers.

The fixture `openapi.trimmed.json` is OpenAI's own document (openai/openai-openapi, commit and version in its
`info.x-source`; `trim.py` made it), an OpenAPI 3.1 document whose schemas are JSON Schema 2020-12. Read strictly:

- `null` is valid only where the document allows it: `{"type": "null"}` in an anyOf/oneOf, or the OpenAPI 3.0
  keyword `nullable: true` (still present in the 3.1 document) on a field of a scalar type: `finish_reason` of a
  chunk, which OpenAI itself sends as null. `nullable: true` on an object or array field (a chunk's `logprobs`,
  `usage`) is not honoured: such fields are omitted or filled, never null;
- a `null` in a field the document does not declare is refused too (vLLM's `stop_reason: null`, ...); other
  undeclared fields are allowed (alignloop's `adapter` on a model);
- OpenAI streams legacy completions as `CreateCompletionResponse` objects whose `finish_reason` is null until the
  last chunk; the document has no schema of its own for those chunks, so `x-CreateCompletionChunk` is that schema
  with a null `finish_reason` allowed.

Validation uses `jsonschema` (Draft 2020-12) with a `referencing` registry holding the document.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

FIXTURE = Path(__file__).with_name("openapi.trimmed.json")
BASE_URI = "urn:openai-openapi"
SCALARS = {"string", "integer", "number", "boolean"}
NOT_NULL = {"not": {"type": "null"}}


def _allof_members(schemas: dict) -> set[int]:
    """ids of the schema objects that are members of an allOf (directly or by $ref): an unevaluatedProperties on
    them would judge the properties their siblings declare."""
    members: set[int] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for member in value.get("allOf", []):
                ref = member.get("$ref", "")
                members.add(id(schemas[ref.rsplit("/", 1)[1]]) if ref else id(member))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(schemas)
    return members


def _strict(value, members: set[int]):
    """The rewrite described in the module's docstring, in place."""
    if isinstance(value, list):
        for item in value:
            _strict(item, members)
        return
    if not isinstance(value, dict):
        return
    if value.pop("nullable", False):
        kind = value.get("type")
        if isinstance(kind, str) and kind in SCALARS:
            value["type"] = [kind, "null"]
            if "enum" in value:
                value["enum"] = [*value["enum"], None]
        elif "$ref" in value or kind in ("object", "array"):
            pass  # null refused: omit the field or fill it
    if ("properties" in value or "allOf" in value) and id(value) not in members:
        value.setdefault("unevaluatedProperties", NOT_NULL)
    for item in value.values():
        _strict(item, members)


@functools.cache
def document() -> dict:
    doc = json.loads(FIXTURE.read_text())
    schemas = doc["components"]["schemas"]
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["type"], finish["enum"] = ["string", "null"], [*finish["enum"], None]
    schemas["x-CreateCompletionChunk"] = chunk
    _strict(schemas, _allof_members(schemas))
    return doc


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(BASE_URI, Resource.from_contents(document(), default_specification=DRAFT202012))


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    if schema_name not in document()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name} in the fixture")
    return jsonschema.Draft202012Validator(
        {"$ref": f"{BASE_URI}#/components/schemas/{schema_name}"}, registry=_registry()
    )


def schema_of(path: str, method: str, media_type: str = "application/json") -> str:
    """The schema the document gives the 200 answer of an operation (`/responses`, `post`, `text/event-stream`)."""
    content = document()["paths"][path][method]["responses"]["200"]["content"][media_type]
    return content["schema"]["$ref"].rsplit("/", 1)[1]


def errors(schema_name: str, instance) -> list[str]:
    """Every way `instance` breaks the schema, one readable line each (empty: it conforms)."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [_describe(error) for error in found]


def _describe(error: jsonschema.ValidationError) -> str:
    path = "/".join(str(part) for part in error.absolute_path) or "<root>"
    if error.context:  # anyOf/oneOf: the closest branch says most
        best = jsonschema.exceptions.best_match(error.context)
        return f"{path}: {best.message} (at {'/'.join(str(p) for p in best.absolute_path) or '<root>'})"
    return f"{path}: {error.message}"


def assert_conforms(schema_name: str, instance) -> None:
    problems = errors(schema_name, instance)
    assert not problems, f"{schema_name}:\n  " + "\n  ".join(problems) + f"\n{json.dumps(instance)[:1500]}"


@functools.cache
def stream_event_schemas() -> dict[str, str]:
    """Responses stream event type -> its schema, from the document's ResponseStreamEvent."""
    schemas = document()["components"]["schemas"]
    by_type = {}
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        kind = schemas[name].get("properties", {}).get("type", {}).get("enum", [None])[0]
        if kind:
            by_type[kind] = name
    return by_type


def assert_stream_event_conforms(event: dict) -> None:
    """A Responses stream event against the schema of its own type (an unknown type fails)."""
    kind = event.get("type")
    assert kind in stream_event_schemas(), f"{kind!r} is not an event type of OpenAI's Responses stream"
    assert_conforms(stream_event_schemas()[kind], event)
