"""The envelope's bytes: building one, reading one back, the echo rewrite, and
hellos. No other module spells or parses the envelope.

A stored envelope is::

    {"type":"directives","seq":N,"audience":A,"directives":[...],"origin":T}

``origin`` is there only when the change came from a request whose client id
is bound to a user or session (:func:`verity_django.clients.tag_for`). It is
a fixed-length tag at the very end, so it is found and cut without parsing,
and no reader ever receives it: a direct stream turns the envelope into an
empty echo for the one connection whose own tag it is, and cuts the tag for
everyone else; GRIP publishes and replays carry the envelope without it.

Pushed envelopes and their directives carry no ``source``: a client drops an
envelope whose ``source`` is its own id *before* its seq bookkeeping, so
anyone who copied another page's id could blank that page's envelopes.
Without ``source``, an envelope always goes through the client's seq
bookkeeping, and the directives the originator already applied from its pull
copy are skipped by their idempotency keys (``PROTOCOL.md`` §1 and §3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from verity_django import directives as d

EVENT_TYPE = "message"
HEAD = '{"type":"directives","seq":'
TAG_LENGTH = 32
_ORIGIN = ',"origin":"'
# ,"origin":"<tag>"}  at the end of a stored envelope that has one.
_SUFFIX = len(_ORIGIN) + TAG_LENGTH + 2
_TAG = re.compile(f"[0-9a-f]{{{TAG_LENGTH}}}")
_PARSE = re.compile(r'\{"type":"directives","seq":(\d+),"audience":"([^"\\]*)"')


class Unencodable(ValueError):
    """An envelope whose directives cannot be written as JSON."""


def parts(audience: str, items: Sequence[d.Directive], origin: str | None) -> tuple[str, str]:
    """The envelope split around its seq, which the storage fills in when it
    allocates it: ``HEAD + str(seq) + tail``."""
    if origin is not None and not _TAG.fullmatch(origin):
        raise ValueError(f"an origin is {TAG_LENGTH} lowercase hex digits, got {origin!r}")
    try:
        body = d.dumps([x.to_dict(source=False) for x in items])
    except (ValueError, TypeError) as exc:
        raise Unencodable(f"audience {audience!r}: {exc}") from exc
    tail = ',"audience":' + d.dumps(audience) + ',"directives":' + body
    if origin is not None:
        tail += _ORIGIN + origin + '"'
    return HEAD, tail + "}"


def origin_of(data: str) -> str | None:
    if len(data) < _SUFFIX or not data.endswith('"}'):
        return None
    if data[-_SUFFIX : -_SUFFIX + len(_ORIGIN)] != _ORIGIN:
        return None
    return data[-TAG_LENGTH - 2 : -2]


def public(data: str) -> str:
    """The envelope as every reader gets it: without its origin tag."""
    if origin_of(data) is None:
        return data
    return data[:-_SUFFIX] + "}"


def for_connection(data: str, tag: str | None) -> str:
    """The envelope as one direct connection gets it: the same seq with no
    directives if the connection's own client caused it (it applied them from
    its pull copy already), else :func:`public`."""
    origin = origin_of(data)
    if origin is None:
        return data
    if tag is not None and origin == tag:
        found = parse(data)
        if found is not None:
            seq, audience = found
            return d.dumps(
                {"type": "directives", "seq": seq, "audience": audience, "directives": []}
            )
    return data[:-_SUFFIX] + "}"


def parse(data: str, at: int = 0) -> tuple[int, str] | None:
    """(seq, audience) of the envelope starting at ``data[at:]``, if it is one."""
    match = _PARSE.match(data, at)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def is_envelope(data: str) -> bool:
    return data.startswith(HEAD)


def hello(audience: str, last_seq: int) -> str:
    """The SSE event a connection starts with, per audience."""
    return sse(d.dumps({"type": "hello", "audience": audience, "last_seq": last_seq}))


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def public_stream(text: str) -> str:
    """SSE text (a GRIP response body) with every envelope's origin cut."""
    if _ORIGIN not in text:
        return text
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if line.startswith("data: " + HEAD):
            lines[index] = "data: " + public(line[6:])
    return "\n".join(lines)
