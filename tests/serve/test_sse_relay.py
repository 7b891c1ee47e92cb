"""`sse_data`: the relay's reader of vLLM's event stream, fed network reads cut at awkward places."""

from __future__ import annotations

import asyncio

import httpx

from serve.serving import encode_json, sse_data


def data_groups(reads: list[bytes]) -> list[list[bytes]]:
    async def body():
        for read in reads:
            yield read

    async def collect():
        return [group async for group in sse_data(httpx.Response(200, content=body()))]

    return asyncio.run(collect())


def test_events_that_arrive_together_stay_together():
    assert data_groups([b'data: {"a":1}\n\ndata: {"b":2}\n\n', b"data: [DONE]\n\n"]) == [
        [b'{"a":1}', b'{"b":2}'],
        [b"[DONE]"],
    ]


def test_an_event_cut_across_reads_is_joined():
    assert data_groups([b'data: {"a"', b":1}\n", b'\ndata: {"b":2}\n\n']) == [[b'{"a":1}'], [b'{"b":2}']]


def test_crlf_lines_comments_and_other_fields_are_handled():
    reads = [b': keep-alive\r\n\r\nevent: message\r\ndata: {"a":1}\r\n\r\nid: 7\r\n', b"data:[DONE]"]
    assert data_groups(reads) == [[b'{"a":1}'], [b"[DONE]"]]


def test_an_empty_body_has_no_events():
    assert data_groups([]) == [] and data_groups([b"\n\n"]) == []


def test_request_bodies_are_compact_utf8_json_and_big_integers_still_go_up():
    assert encode_json({"text": "café", "n": [1, 2.5]}) == '{"text":"café","n":[1,2.5]}'.encode()
    # orjson refuses integers over 64 bits; a passed-through field may hold one, and vLLM is the one to judge it
    assert encode_json({"seed": 2**70}) == b'{"seed":1180591620717411303424}'
