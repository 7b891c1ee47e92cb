"""Trims OpenAI's OpenAPI document to what the gateway's conformance test reads, and writes the test fixture.

The source is openapi.json of https://github.com/openai/openai-openapi (OpenAI's own publication of the spec). This
keeps the 200 responses of the operations the gateway serves, and the component schemas reachable from them;
`description`, `example(s)` and `x-oaiMeta` are removed (text only, no validation keyword). Nothing else changes.

    .venv/bin/python tests/serve/openai_openapi/trim.py /path/to/openai-openapi/openapi.json \\
        --commit <40-hex commit of openai/openai-openapi> --date YYYY-MM-DD
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

OPERATIONS = [
    ("/chat/completions", "post"),
    ("/completions", "post"),
    ("/responses", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
]
EXTRA_SCHEMAS = ["ErrorResponse"]  # the error shape every non-200 answer has
TEXT_ONLY = {"description", "example", "examples", "x-oaiMeta"}
FIXTURE = Path(__file__).with_name("openapi.trimmed.json")


def strip(value):
    if isinstance(value, dict):
        return {key: strip(item) for key, item in value.items() if key not in TEXT_ONLY}
    if isinstance(value, list):
        return [strip(item) for item in value]
    return value


def referenced(value, schemas: dict, found: set[str]) -> None:
    if isinstance(value, dict):
        ref = value.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in found:
                found.add(name)
                referenced(schemas[name], schemas, found)
        for item in value.values():
            referenced(item, schemas, found)
    elif isinstance(value, list):
        for item in value:
            referenced(item, schemas, found)


def trim(document: dict, commit: str, date: str, sha256: str) -> dict:
    paths = {}
    for path, method in OPERATIONS:
        ok = document["paths"][path][method]["responses"]["200"]
        paths.setdefault(path, {})[method] = {"responses": {"200": strip(ok)}}
    schemas = document["components"]["schemas"]
    found = set(EXTRA_SCHEMAS)
    referenced(paths, schemas, found)
    for name in EXTRA_SCHEMAS:
        referenced(schemas[name], schemas, found)
    return {
        "openapi": document["openapi"],
        "info": {
            "title": document["info"]["title"],
            "version": document["info"]["version"],
            "x-source": {
                "repository": "https://github.com/openai/openai-openapi",
                "file": "openapi.json",
                "commit": commit,
                "commit_date": date,
                "sha256": sha256,
                "trimmed_by": "tests/serve/openai_openapi/trim.py",
            },
        },
        "paths": paths,
        "components": {"schemas": {name: strip(schemas[name]) for name in sorted(found)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="openapi.json of openai/openai-openapi")
    parser.add_argument("--commit", required=True, help="the commit of openai/openai-openapi it was taken from")
    parser.add_argument("--date", required=True, help="that commit's date")
    args = parser.parse_args()
    raw = args.source.read_bytes()
    trimmed = trim(json.loads(raw), args.commit, args.date, hashlib.sha256(raw).hexdigest())
    FIXTURE.write_text(json.dumps(trimmed, indent=1, sort_keys=False) + "\n")
    print(f"wrote {FIXTURE} ({len(trimmed['components']['schemas'])} schemas)")


if __name__ == "__main__":
    main()
