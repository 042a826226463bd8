from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from verity_django.audiences import channel_for
from verity_django.storage import configured


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def envelopes(audience: str) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in configured().get_events(channel_for(audience), 0)]


def test_force_reload_defaults_to_global_and_prints_key_and_seq(db: Any) -> None:
    output = run("verity_force_reload")
    [envelope] = envelopes("global")
    [directive] = envelope["directives"]
    assert directive["op"] == "force_reload_page"
    assert directive["idempotency_key"].startswith("force-reload-")
    assert "source" not in envelope and "source" not in directive
    assert "audience 'global' with seq 1" in output
    assert directive["idempotency_key"] in output


def test_force_reload_hard_to_several_audiences_with_key(db: Any) -> None:
    run(
        "verity_force_reload",
        "--audience",
        "user-1",
        "--audience",
        "team-x",
        "--hard",
        "--idempotency-key",
        "deploy-v2",
    )
    for audience in ("user-1", "team-x"):
        [envelope] = envelopes(audience)
        assert envelope["directives"][0]["hard"] is True
        assert envelope["directives"][0]["idempotency_key"] == "deploy-v2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audience", "bad audience"], "invalid audience 'bad audience'"),
        (["--idempotency-key", ""], "missing required field 'idempotency_key'"),
    ],
)
def test_force_reload_bad_input(db: Any, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("verity_force_reload", *args)


def test_emit_publishes_validated_json(db: Any) -> None:
    output = run(
        "verity_emit",
        '[{"op":"refresh_collection","name":"todos","params":{"status":"done"}}]',
        "--audience",
        "user-3",
    )
    [envelope] = envelopes("user-3")
    assert envelope["directives"][0]["params"] == {"status": "done"}
    assert "seq 1" in output


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "Not valid JSON"),
        ("[]", "at least one directive"),
        ('{"op":"refresh_item","name":"todo"}', "missing required field 'id'"),
        (
            '[{"op":"refresh_item","name":"t","id":1},{"op":"x"}]',
            "directive 1: 'op' must be one of",
        ),
        ('{"op":"force_reload_page","source":"me"}', "must not carry a 'source'"),
    ],
)
def test_emit_bad_input(db: Any, payload: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("verity_emit", payload)
    assert envelopes("global") == []


def test_tail_prints_stored_envelopes(db: Any) -> None:
    run("verity_emit", '{"op":"refresh_collection","name":"a"}')
    run("verity_emit", '{"op":"refresh_collection","name":"b"}')
    output = run("verity_tail", "--since", "0", "--count", "2", "--timeout", "5")
    lines = [json.loads(line) for line in output.splitlines()]
    assert [x["seq"] for x in lines] == [1, 2]


def test_tail_rejects_bad_audience(db: Any) -> None:
    with pytest.raises(CommandError, match="invalid audience"):
        run("verity_tail", "--audience", "a b", "--timeout", "0")


def test_tail_keeps_its_position_after_a_gap(db: Any) -> None:
    from django_eventstream.models import Event as EventRow

    for name in "abc":
        run("verity_emit", f'{{"op":"refresh_collection","name":"{name}"}}')
    # Seq 1 and 2 were trimmed: the tail goes on from 3 and prints each later
    # envelope once, instead of re-reading from the current seq on every poll.
    EventRow.objects.filter(eid__lt=3).delete()
    err = StringIO()
    out = StringIO()
    call_command(
        "verity_tail",
        "--since",
        "0",
        "--timeout",
        "1",
        "--interval",
        "0.05",
        stdout=out,
        stderr=err,
    )
    assert "no longer stored" in err.getvalue()
    assert out.getvalue() == ""  # 3 is the current seq: nothing after it yet
