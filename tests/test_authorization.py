"""Who reads what: the events endpoint, the AUTHORIZE hook, and what envelopes carry.

- For thousands of audience strings (look-alikes of real ones included), the
  events endpoint answers 400 for what is not an audience name, and otherwise
  exactly what ``verity_django.audiences.can_read`` says: 200 or 403. And
  ``can_read`` itself matches an independent oracle: ``global`` (for anonymous
  users only while GLOBAL_REQUIRES_AUTHENTICATION is off) and ``user-<own pk>``.
- A project hook (teams) is only ever asked about validated names.
- ``result`` payloads follow the object's audience: bob's stream never carries
  alice's todo data, unless bob may read an audience the todo is shared with.
- Pull copies follow the same rule: a response carries a directive only when
  its requester may read one of the directive's audiences, and its ``result``
  only when the requester may read one of the object's current audiences,
  even when a receiver changed other users' private rows in that request.
  AUTHORIZE is asked once per request and audience.
- Session-authenticated mutations need CSRF as DRF requires, verity or not.
- A result larger than RESULT_MAX_BYTES is dropped from the directive and logged.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import AnonymousUser
from django.http import StreamingHttpResponse
from django.test import Client, override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

import verity_django
from tests.conftest import DIRECTIVE_HEADERS as _DIRECTIVE_HEADERS
from tests.testapp.models import Project, Todo
from verity_django import registry
from verity_django.audiences import can_read, default_authorize, is_valid_audience
from verity_django.rules import RefreshItem
from verity_django.storage import configured

DIRECTIVE_HEADERS: dict[str, Any] = dict(_DIRECTIVE_HEADERS)

# --------------------------------------------------------------------------
# Audience strings
# --------------------------------------------------------------------------

CONFUSABLES = {
    "a": ["\u0430", "\u00e0", "\uff41", "\u0251"],
    "e": ["\u0435", "\u00e9", "\uff45"],
    "l": ["\u0131", "1", "I", "\u04cf", "\uff4c"],
    "o": ["\u043e", "0", "\u00f8", "\uff4f"],
    "s": ["\u0455", "\uff53"],
    "u": ["\u03c5", "\uff55", "\u00fc"],
    "1": ["\u0661", "\uff11", "\u00b9", "l", "I", "\U0001d7cf"],
    "2": ["\u0662", "\uff12", "\u00b2"],
    "-": ["\u2010", "\u2011", "\u2212", "\u00ad", "_", "--", "\u2013"],
}
AROUND = ["", " ", "\t", "\n", "\r\n", "\x00", "\u200b", "\ufeff", "\u00a0", ".", "-", "_", "%20"]
JOINERS = [",", ";", " ", "|", "&", "/", ":", "+", "%2C", "\n"]


def lookalikes(real: str) -> list[str]:
    """Variants of a real audience name that a sloppy check could mistake for it."""
    out = {real, real.upper(), real.title(), real.swapcase(), real + real}
    out |= {f"{before}{real}{after}" for before in AROUND for after in AROUND}
    for i, char in enumerate(real):
        for other in CONFUSABLES.get(char, []):
            out.add(real[:i] + other + real[i + 1 :])
    if "-" in real:
        prefix, _, rest = real.partition("-")
        out |= {
            f"{prefix}-0{rest}",
            f"{prefix}-00{rest}",
            f"{prefix}-+{rest}",
            f"{prefix}--{rest}",
            f"{prefix}-{rest}.0",
            f"{prefix}-{rest}e0",
            f"{prefix}-0x{rest}",
            f"{prefix}-{rest}0",
            f"{prefix}{rest}",
            f"{prefix}_{rest}",
            f"{prefix}.{rest}",
            f"{prefix.upper()}-{rest}",
        }
    out |= {
        f"verity.{real}",
        f"../{real}",
        f"{real}/..",
        f"{real}:0",
        f"{real}%00",
        f"%{ord(real[0]):02x}{real[1:]}",
    }
    return sorted(out)


def audience_corpus(alice_pk: int, bob_pk: int) -> list[str]:
    reals = ["global", f"user-{alice_pk}", f"user-{bob_pk}", "team-x", "user-0", "user-999"]
    corpus = {v for real in reals for v in lookalikes(real)}
    for left, right in itertools.permutations(reals[:4], 2):
        corpus |= {f"{left}{j}{right}" for j in JOINERS}
    corpus |= {"", "-", ".", "_", "a" * 100, "a" * 101, "user-" + "1" * 95, "user-" + "1" * 96}
    return sorted(corpus)


def oracle(user: Any, audience: str, *, global_requires_authentication: bool = False) -> bool:
    """Who may read what under the default hook, spelled out independently."""
    authenticated = bool(user.is_authenticated)
    if audience == "global":
        return authenticated or not global_requires_authentication
    return authenticated and audience == f"user-{user.pk}"


# --------------------------------------------------------------------------
# The events endpoint agrees with can_read, and can_read with the oracle
# --------------------------------------------------------------------------


class Handed:
    """Stands in for django-eventstream's view: records the channels, answers 200."""

    def __init__(self) -> None:
        self.channels: list[list[str]] = []

    def __call__(self, request: Any, **kwargs: Any) -> StreamingHttpResponse:
        self.channels.append(list(kwargs["channels"]))

        async def nothing() -> Any:
            yield b""

        return StreamingHttpResponse(nothing(), content_type="text/event-stream")


@contextmanager
def handed() -> Iterator[Handed]:
    import django_eventstream.views

    recorder = Handed()
    with mock.patch.object(django_eventstream.views, "events", recorder):
        yield recorder


def endpoint_status(client: Client, audiences: list[str]) -> tuple[int, Any]:
    response = client.get("/api/events", {"audience": audiences})
    if isinstance(response, StreamingHttpResponse):
        response.close()
        return response.status_code, None
    return response.status_code, response.json()


@pytest.fixture
def clients(alice: Any, bob: Any) -> dict[str, tuple[Any, Client]]:
    alice_client, bob_client = Client(), Client()
    alice_client.force_login(alice)
    bob_client.force_login(bob)
    return {
        "anonymous": (AnonymousUser(), Client()),
        "alice": (alice, alice_client),
        "bob": (bob, bob_client),
    }


def check_corpus(
    clients: dict[str, tuple[Any, Client]], corpus: list[str], *, gra: bool
) -> dict[str, int]:
    """Every string, every user: the endpoint follows can_read, can_read the oracle."""
    counts = {"400": 0, "403": 0, "200": 0}
    mismatches: list[str] = []
    with handed() as recorder:
        for (name, (user, client)), audience in itertools.product(clients.items(), corpus):
            readable = can_read(user, audience)
            if readable != (
                is_valid_audience(audience)
                and oracle(user, audience, global_requires_authentication=gra)
            ):
                mismatches.append(f"can_read({name}, {audience!r}) = {readable}")
            before = len(recorder.channels)
            status, body = endpoint_status(client, [audience])
            counts[str(status)] = counts.get(str(status), 0) + 1
            expected = 400 if not is_valid_audience(audience) else 200 if readable else 403
            if status != expected:
                mismatches.append(f"{name} {audience!r}: HTTP {status}, expected {expected}")
            if status == 200:
                if recorder.channels[before:] != [[f"verity.{audience}"]]:
                    mismatches.append(f"{name} {audience!r}: handed {recorder.channels[before:]}")
            elif len(recorder.channels) != before:
                mismatches.append(f"{name} {audience!r}: refused but streamed")
            if status == 403 and body != {
                "detail": "You may not read these audiences.",
                "audiences": [audience],
            }:
                mismatches.append(f"{name} {audience!r}: 403 body {body}")
    assert mismatches == []
    return counts


@pytest.mark.parametrize("gra", [False, True], ids=["global-open", "global-needs-login"])
def test_events_endpoint_follows_can_read_for_lookalikes(
    clients: dict[str, tuple[Any, Client]], alice: Any, bob: Any, gra: bool
) -> None:
    corpus = audience_corpus(alice.pk, bob.pk)
    assert len(corpus) > 1000
    with override_settings(VERITY={"GLOBAL_REQUIRES_AUTHENTICATION": gra}):
        counts = check_corpus(clients, corpus, gra=gra)
    # global for everyone (not anonymous when it needs a login), and each user's own.
    assert counts["200"] == (4 if gra else 5)
    print(f"\n{len(corpus)} audience strings x 3 users: {counts}")


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    audience=st.one_of(
        st.text(max_size=30),
        st.text(alphabet="usertamglob-_.0123456789 ,\n", max_size=15),
        st.from_regex(r"(user|team|global)-?[0-9]{0,3}", fullmatch=True),
    )
)
def test_events_endpoint_follows_can_read_generated(
    clients: dict[str, tuple[Any, Client]], alice: Any, audience: str
) -> None:
    audience = audience.replace("user-1", f"user-{alice.pk}")
    check_corpus(clients, [audience], gra=False)


def test_several_audiences_refused_together(
    clients: dict[str, tuple[Any, Client]], alice: Any, bob: Any
) -> None:
    _, client = clients["alice"]
    own, other = f"user-{alice.pk}", f"user-{bob.pk}"
    with handed() as recorder:
        assert endpoint_status(client, ["global", own])[0] == 200
        status, body = endpoint_status(client, ["global", other, own, "team-x"])
        assert (status, body["audiences"]) == (403, [other, "team-x"])
        assert endpoint_status(client, ["global", f"{own},{other}"])[0] == 400
    assert recorder.channels == [["verity.global", f"verity.{own}"]]


def test_anonymous_with_auto_subscribe_gets_global_only(
    clients: dict[str, tuple[Any, Client]], alice: Any
) -> None:
    with (
        override_settings(VERITY={"AUTO_SUBSCRIBE_USER_AUDIENCES": True}),
        handed() as recorder,
    ):
        assert endpoint_status(clients["anonymous"][1], [])[0] == 200
        assert endpoint_status(clients["alice"][1], [])[0] == 200
    assert recorder.channels == [["verity.global"], ["verity.global", f"verity.user-{alice.pk}"]]


# --------------------------------------------------------------------------
# A project's own hook (teams) only ever sees validated names
# --------------------------------------------------------------------------

TEAM_MEMBERS: dict[str, set[str]] = {"team-x": set()}
ASKED: list[str] = []


def team_authorize(user: Any, audience: str) -> bool:
    ASKED.append(audience)
    if audience.startswith("team-"):
        return bool(user.is_authenticated) and user.username in TEAM_MEMBERS.get(audience, set())
    return default_authorize(user, audience)


@pytest.fixture
def teams() -> Iterator[dict[str, set[str]]]:
    TEAM_MEMBERS.clear()
    TEAM_MEMBERS["team-x"] = set()
    ASKED.clear()
    with override_settings(VERITY={"AUTHORIZE": f"{__name__}.team_authorize"}):
        yield TEAM_MEMBERS
    TEAM_MEMBERS.clear()
    ASKED.clear()


def test_team_hook_sees_only_valid_names_and_is_followed(
    teams: dict[str, set[str]], clients: dict[str, tuple[Any, Client]], alice: Any, bob: Any
) -> None:
    teams["team-x"].add("bob")
    corpus = sorted(set(lookalikes("team-x")) | {"team-y", "team-", "team-x-"})
    with handed():
        for name, (_user, client) in clients.items():
            for audience in corpus:
                status, _ = endpoint_status(client, [audience])
                if not is_valid_audience(audience):
                    assert status == 400
                elif name == "bob" and audience == "team-x":
                    assert status == 200
                else:
                    assert status == 403, (name, audience)
    assert ASKED and all(is_valid_audience(a) for a in ASKED)


# --------------------------------------------------------------------------
# result payloads follow the object's audience
# --------------------------------------------------------------------------

SHARED_PREFIX = "[team-x] "


def todo_result(todo: Todo) -> dict[str, Any]:
    return {"id": todo.pk, "title": todo.title, "description": todo.description}


def todo_audiences(todo: Todo) -> list[str]:
    """The owner, plus team-x for todos shared with it (by title, for the test)."""
    audiences = [f"user-{todo.owner_id}"]
    if todo.title.startswith(SHARED_PREFIX):
        audiences.append("team-x")
    return audiences


@contextmanager
def todo_rules(
    result: Callable[[Todo], Any], audience: Any = "owner", **item: Any
) -> Iterator[None]:
    """Replace Todo's own RefreshItem with one that carries ``result``, for a test."""
    original = registry.declaration(Todo)
    directives = [
        RefreshItem("todo", result=result, **item)
        if isinstance(rule, RefreshItem) and rule.name == "todo"
        else rule
        for rule in original.directives
    ]
    verity_django.register(
        Todo, directives=directives, audience=audience, relations=original.relations
    )
    try:
        yield
    finally:
        verity_django.register(
            Todo,
            directives=original.directives,
            audience=original.audience,
            relations=original.relations,
        )


def envelopes_by_channel() -> dict[str, list[dict[str, Any]]]:
    from django_eventstream.models import EventCounter

    out: dict[str, list[dict[str, Any]]] = {}
    for channel in EventCounter.objects.values_list("name", flat=True):
        out[channel] = [json.loads(e.data) for e in configured().get_events(channel, 0, 10_000)]
    return out


def channels_mentioning(secret: str) -> set[str]:
    return {
        channel
        for channel, envelopes in envelopes_by_channel().items()
        if any(secret in json.dumps(e) for e in envelopes)
    }


def readable_channels(user: Any) -> set[str]:
    return {c for c in envelopes_by_channel() if can_read(user, c.removeprefix("verity."))}


@pytest.mark.django_db(transaction=True)
def test_result_goes_only_to_the_todos_audiences(
    teams: dict[str, set[str]], alice: Any, bob: Any
) -> None:
    private = Todo.objects.create(title="private", owner=alice)
    shared = Todo.objects.create(title=SHARED_PREFIX + "shared", owner=alice)
    api = APIClient()
    api.force_login(alice)
    with todo_rules(todo_result, audience=todo_audiences):
        for todo, secret in ((private, "alice-private-secret"), (shared, "alice-shared-secret")):
            response = api.patch(
                f"/api/todos/{todo.pk}/",
                {"description": secret},
                format="json",
                **DIRECTIVE_HEADERS,
            )
            assert response.status_code == 200
            [item] = [x for x in response.json()["directives"] if x["op"] == "refresh_item"]
            assert item["result"]["data"]["description"] == secret  # alice's own pull copy

        # One request changing both: each audience's envelope has only its own todos.
        with verity_django.batch():
            for todo in (private, shared):
                todo.description += " (both)"
                todo.save()

    alice_channel = f"verity.user-{alice.pk}"
    assert channels_mentioning("alice-private-secret") == {alice_channel}
    # The shared todo's result follows its audience: alice and team-x.
    assert channels_mentioning("alice-shared-secret") == {alice_channel, "verity.team-x"}
    team_envelopes = envelopes_by_channel()["verity.team-x"]
    assert all(
        x.get("id") == shared.pk for e in team_envelopes for x in e["directives"] if "id" in x
    )

    # Bob reads only what the hook allows: his own audience and global, not team-x...
    assert "verity.team-x" not in readable_channels(bob)
    assert alice_channel not in readable_channels(bob)
    bob_client = Client()
    bob_client.force_login(bob)
    with handed() as recorder:
        assert endpoint_status(bob_client, ["team-x"])[0] == 403
        assert endpoint_status(bob_client, [f"user-{alice.pk}"])[0] == 403
        # ... until he joins the team: then the shared todo's data is his to read.
        teams["team-x"].add("bob")
        assert endpoint_status(bob_client, ["team-x"])[0] == 200
        assert endpoint_status(bob_client, [f"user-{alice.pk}"])[0] == 403
    assert recorder.channels == [["verity.team-x"]]
    assert "verity.team-x" in readable_channels(bob)
    assert "alice-private-secret" not in json.dumps(
        [envelopes_by_channel()[c] for c in readable_channels(bob)]
    )


@pytest.mark.django_db(transaction=True)
def test_result_is_not_sent_to_an_audience_the_object_left(alice: Any, bob: Any) -> None:
    """A todo handed from bob to alice in a save that also writes alice's data.

    Both owners are told that the item changed (bob must drop it from his
    lists), but the item's new data is alice's now: bob's stream must not
    carry it.
    """
    todo = Todo.objects.create(title="hand-over", owner=bob)
    todo = Todo.objects.get(pk=todo.pk)
    with todo_rules(todo_result):
        todo.owner = alice
        todo.description = "alice-only-after-handover"
        todo.save()
    bob_channel = f"verity.user-{bob.pk}"
    envelopes = envelopes_by_channel()
    assert any(x.get("id") == todo.pk for e in envelopes[bob_channel] for x in e["directives"]), (
        "bob is told the item changed"
    )
    leaked = channels_mentioning("alice-only-after-handover") - {f"verity.user-{alice.pk}"}
    assert leaked == set(), (
        f"the todo's new data (its result) also went to {sorted(leaked)}, the audience of "
        "its previous owner, who may no longer read it"
    )


# --------------------------------------------------------------------------
# Pull copies: only what the requester may read
# --------------------------------------------------------------------------


@contextmanager
def denormalized_project_names() -> Iterator[None]:
    """A receiver that keeps each todo's description in step with its
    project's name, whoever owns the todo: one user's request then changes
    other users' private rows."""
    from django.db.models.signals import post_save

    def note(sender: Any, instance: Project, **kwargs: Any) -> None:
        for todo in Todo.objects.filter(project=instance):
            todo.description = f"{todo.description.split(' | ')[0]} | in {instance.name}"
            todo.save()

    post_save.connect(note, sender=Project, dispatch_uid="test-denormalize", weak=False)
    try:
        yield
    finally:
        post_save.disconnect(sender=Project, dispatch_uid="test-denormalize")


def todo_items(body: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {
        x["id"]: x for x in body["directives"] if x["op"] == "refresh_item" and x["name"] == "todo"
    }


@pytest.mark.django_db(transaction=True)
def test_pull_copy_leaves_out_other_users_private_rows(alice: Any, bob: Any) -> None:
    """The reproduction from issue 12: renaming a shared project rewrites bob's
    private todo, whose rule sends ``result=``; alice's PATCH response carried
    bob's todo id and its private text."""
    project = Project.objects.create(name="shared", owner=alice)
    mine = Todo.objects.create(title="alice-note", owner=alice, project=project)
    theirs = Todo.objects.create(
        title="bob-private-title", description="bob-private-body", owner=bob, project=project
    )
    api = APIClient()
    api.force_login(alice)
    with todo_rules(todo_result), denormalized_project_names():
        response = api.patch(
            f"/api/projects/{project.pk}/", {"name": "renamed"}, format="json", **DIRECTIVE_HEADERS
        )
    assert response.status_code == 200
    body = response.json()
    assert "bob-private" not in json.dumps(body)
    items = todo_items(body)
    assert set(items) == {mine.pk}
    assert items[mine.pk]["result"]["data"]["description"] == " | in renamed"
    assert items[mine.pk]["result"]["data"]["title"] == "alice-note"
    # The push path still tells bob, with his data.
    bob_envelopes = envelopes_by_channel()[f"verity.user-{bob.pk}"]
    assert theirs.pk in {x.get("id") for e in bob_envelopes for x in e["directives"]}
    assert "bob-private-body" in json.dumps(bob_envelopes)


@pytest.mark.django_db(transaction=True)
def test_pull_copy_drops_the_result_of_an_object_the_requester_handed_away(
    alice: Any, bob: Any
) -> None:
    """Alice hands her todo to bob: she is told it changed (it leaves her
    lists), but its data is bob's now."""
    todo = Todo.objects.create(title="hand-over", owner=alice)
    api = APIClient()
    api.force_login(alice)

    def hand_to_bob(sender: Any, instance: Todo, **kwargs: Any) -> None:
        if instance.owner_id == alice.pk and instance.title == "handed":
            fresh = Todo.objects.get(pk=instance.pk)
            fresh.owner = bob
            fresh.description = "bob-only-now"
            fresh.save()

    from django.db.models.signals import post_save

    with todo_rules(todo_result):
        # Connected after the rules, so it runs after verity's own receiver.
        post_save.connect(hand_to_bob, sender=Todo, dispatch_uid="test-hand-over", weak=False)
        try:
            response = api.patch(
                f"/api/todos/{todo.pk}/", {"title": "handed"}, format="json", **DIRECTIVE_HEADERS
            )
        finally:
            post_save.disconnect(sender=Todo, dispatch_uid="test-hand-over")
    assert response.status_code == 200
    body = response.json()
    items = todo_items(body)
    assert set(items) == {todo.pk}
    assert "result" not in items[todo.pk]
    assert "bob-only-now" not in json.dumps(body)


COUNTED: list[str] = []


def counting_authorize(user: Any, audience: str) -> bool:
    COUNTED.append(audience)
    return default_authorize(user, audience)


@pytest.mark.django_db(transaction=True)
def test_authorize_is_asked_once_per_request_and_audience(alice: Any, bob: Any) -> None:
    project = Project.objects.create(name="shared", owner=alice)
    for i in range(30):
        Todo.objects.create(title=f"t{i}", owner=alice if i % 2 else bob, project=project)
    api = APIClient()
    api.force_login(alice)
    COUNTED.clear()
    with (
        todo_rules(todo_result),
        denormalized_project_names(),
        override_settings(VERITY={"AUTHORIZE": f"{__name__}.counting_authorize"}),
    ):
        response = api.patch(
            f"/api/projects/{project.pk}/", {"name": "many"}, format="json", **DIRECTIVE_HEADERS
        )
    assert response.status_code == 200
    assert len(todo_items(response.json())) == 15
    assert sorted(COUNTED) == sorted({"global", f"user-{alice.pk}", f"user-{bob.pk}"})


# --------------------------------------------------------------------------
# CSRF
# --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_csrf_is_enforced_on_session_mutations(alice: Any) -> None:
    with verity_django.disabled():
        todo = Todo.objects.create(title="csrf", owner=alice)
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(alice)
    headers = {**DIRECTIVE_HEADERS, "HTTP_X_VERITY_CLIENT_ID": "tab"}
    refused = [
        api.patch(f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **headers),
        api.post("/api/todos/", {"title": "x"}, format="json", **headers),
        api.delete(f"/api/todos/{todo.pk}/", **headers),
        api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", HTTP_X_CSRFTOKEN="z" * 64
        ),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert all("CSRF" in r.json()["detail"] for r in refused)
    assert envelopes_by_channel() == {}
    # With the token from the cookie, the same request passes.
    api.get("/api/auth/me/")
    token = api.cookies["csrftoken"].value
    ok = api.patch(
        f"/api/todos/{todo.pk}/",
        {"title": "x"},
        format="json",
        HTTP_X_CSRFTOKEN=token,
        **headers,
    )
    assert ok.status_code == 200
    assert [e["seq"] for e in envelopes_by_channel()[f"verity.user-{alice.pk}"]] == [1]


# --------------------------------------------------------------------------
# Size: a result over RESULT_MAX_BYTES is dropped and logged
# --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [100, 2000, 200_000])
def test_oversized_result_is_dropped_and_logged(
    alice: Any, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    with verity_django.disabled():
        todo = Todo.objects.create(title="big", owner=alice)
    api = APIClient()
    api.force_login(alice)
    limit = 1024
    with (
        todo_rules(lambda t: {"blob": "x" * size}),
        override_settings(VERITY={"RESULT_MAX_BYTES": limit}),
        caplog.at_level(logging.WARNING, logger="verity_django"),
    ):
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "bigger"}, format="json", **DIRECTIVE_HEADERS
        )
    assert response.status_code == 200
    [pulled] = [x for x in response.json()["directives"] if x["op"] == "refresh_item"]
    [envelope] = envelopes_by_channel()[f"verity.user-{alice.pk}"]
    [pushed] = [x for x in envelope["directives"] if x["op"] == "refresh_item"]
    # Only the pull copy names the requesting client.
    assert pulled.pop("source") == "client-a"
    assert pulled == pushed
    if size < limit:
        assert pulled["result"]["data"] == {"blob": "x" * size}
        assert "dropped" not in caplog.text
    else:
        assert "result" not in pulled  # the client refetches instead
        assert f"result of todo {todo.pk} (RESULT_MAX_BYTES is {limit})" in caplog.text
        assert len(json.dumps(envelope)) < 2048
