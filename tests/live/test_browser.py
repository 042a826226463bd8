"""End-to-end browser tests of the demo page (issue 4).

Each test starts the demo under a real uvicorn with a fresh SQLite database,
and drives headless Chromium through Playwright's sync API. Every window is a
browser context of its own: its own cookies, session and Verity client id.
Delivery between processes is verity_django's storage tailer (no Redis).

Screenshots go to ``test-output/browser/``; ``VERITY_UPDATE_SCREENSHOT=1``
also refreshes ``docs/demo.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from liveservers.processes import REPO_ROOT, AsgiServer, require_binary, run_manage

from .browser import OUTPUT_DIR, WAIT_MS, Window, launch_chromium, unique
from .conftest import AsgiServerFactory, _test_failed

ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")

Login = Callable[[str, str, str], httpx.Cookies]


class WindowFactory(Protocol):
    def __call__(self, server: AsgiServer, name: str, user: tuple[str, str]) -> Window: ...


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_binary("chromium")
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright, executable)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_window(
    request: pytest.FixtureRequest,
    browser: Browser,
    asgi_server_factory: AsgiServerFactory,  # so windows close before servers stop
) -> Iterator[WindowFactory]:
    """``open_window(server, name, (username, password))``: a logged-in, ready window."""
    opened: list[Window] = []

    def open_(server: AsgiServer, name: str, user: tuple[str, str]) -> Window:
        window = Window(browser, server.base_url, name)
        opened.append(window)
        window.login(*user)
        return window

    try:
        yield open_
    finally:
        failed = _test_failed(request)
        for window in opened:
            if failed:
                print(window.report())
                try:
                    window.screenshot(f"failed-{request.node.name}-{window.name}")
                except Exception as exc:
                    print(f"(no screenshot of {window.name}: {exc})")
            window.close()


def api_client(server: AsgiServer, cookies: httpx.Cookies) -> httpx.Client:
    """An httpx client with a logged-in user's cookies and the CSRF header."""
    token = cookies.get("csrftoken")
    assert token, "the login fixture's cookies carry no csrftoken"
    return httpx.Client(
        base_url=server.base_url,
        cookies=cookies,
        headers={"X-CSRFToken": token},
        timeout=WAIT_MS / 1000,
    )


def assert_no_page_errors(*windows: Window) -> None:
    """No uncaught exception, and no listener of the Verity client threw."""
    for window in windows:
        assert not window.page_errors, f"{window.name}: uncaught errors {window.page_errors}"
        failed = [line for line in window.console if "listener failed" in line]
        assert not failed, f"{window.name}: {failed}"


# --------------------------------------------------------------------------
# 1. Two windows of one user follow each other
# --------------------------------------------------------------------------


def test_two_windows_of_one_user_follow_each_other(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory
) -> None:
    server = asgi_server_factory()
    a = open_window(server, "a", ALICE)
    b = open_window(server, "b", ALICE)
    c = open_window(server, "c", ALICE)
    audience = a.user_audience
    assert len({a.client_id, b.client_id, c.client_id}) == 3
    b.filter("active")
    c.filter("done")
    for window in (b, c):
        window.mark()

    # Create in A: it shows up in B's "active" list, pushed over SSE.
    title = unique("Walk the dog")
    a.create_todo(title)
    expect(b.row(title)).to_have_count(1)
    expect(c.row(title)).to_have_count(0)
    todo_id = a.row(title).get_attribute("data-todo-id")
    assert todo_id
    expect(b.row(title)).to_have_attribute("data-todo-id", todo_id)
    # A new todo changes every list: one refresh_collection, no item to refresh yet.
    create_seq = _echo_and_applied_seq(a, b, audience, 1, "todos (every cached params)")

    # Toggle in A: it leaves B's "active" list and enters C's "done" list.
    a.toggle(title)
    expect(a.row(title)).to_have_attribute("data-status", "done")
    expect(a.row(title).get_by_test_id("todo-toggle")).to_be_checked()
    expect(b.row(title)).to_have_count(0)
    expect(c.row(title)).to_have_count(1)
    expect(c.row(title)).to_have_attribute("data-status", "done")
    toggle_seq = _echo_and_applied_seq(a, b, audience, 2, f"todo {todo_id}")
    assert toggle_seq > create_seq
    expect(
        c.entries(via="push", outcome="applied", audience=audience, seq=toggle_seq)
    ).to_have_count(1)

    # A applied its own directives from the PATCH response (the pull path).
    expect(
        a.entries(via="pull", outcome="applied").filter(has_text=f"PATCH /api/todos/{todo_id}/")
    ).to_have_count(1)
    # The changes came live: neither B nor C reloaded, and nobody saw a gap.
    assert b.marker() == 1
    assert c.marker() == 1
    for window in (a, b, c):
        expect(window.entries(outcome="gap")).to_have_count(0)
        expect(window.entries(outcome="error")).to_have_count(0)
    assert_no_page_errors(a, b, c)


def _echo_and_applied_seq(
    origin: Window, other: Window, audience: str, changes: int, directive: str
) -> int:
    """The seq of change number ``changes`` made in ``origin``.

    ``origin`` got it as an echo (the server rewrites the originating
    connection's copy: same seq, no directives); ``other`` applied it by push,
    and its directives include ``directive`` (as the inspector describes it).
    """
    echoes = origin.entries(via="push", outcome="echo", audience=audience)
    expect(echoes).to_have_count(changes)  # one envelope per change and audience
    seq = int(echoes.first.get_attribute("data-seq") or "0")  # newest first
    applied = other.entries(via="push", outcome="applied", audience=audience, seq=seq)
    expect(applied).to_have_count(1)
    expect(applied).to_contain_text(directive)
    return seq


# --------------------------------------------------------------------------
# 2. Users see only their own todos and envelopes
# --------------------------------------------------------------------------


def test_other_users_window_never_sees_her_todos_or_envelopes(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory, login: Login
) -> None:
    server = asgi_server_factory()
    alice = open_window(server, "alice", ALICE)
    bob = open_window(server, "bob", BOB)
    alice_audience = alice.user_audience
    bob_audience = bob.user_audience
    assert alice_audience != bob_audience
    assert sorted(bob.audiences) == sorted([bob_audience, "global"])
    bob_titles = bob.titles()
    assert "Buy milk" not in bob_titles  # seeded for alice
    assert "Write the report" in bob_titles  # seeded for bob

    titles = [unique("Alice's secret plan"), unique("Alice's dentist appointment")]
    for title in titles:
        alice.create_todo(title)
    # Projects are shared (audience "global"): bob receives alice's new project,
    # which she created after her todos.
    project = unique("Garden")
    form = alice.testid("new-project")
    form.locator("input[name=name]").fill(project)
    form.locator("button[type=submit]").click()
    expect(bob.testid("project-name").filter(has_text=project)).to_have_count(1)
    expect(bob.entries(via="push", outcome="applied", audience="global")).not_to_have_count(0)
    expect(alice.entries(via="push", outcome="echo", audience=alice_audience)).to_have_count(2)

    assert bob.titles() == bob_titles
    for title in titles:
        expect(bob.row(title)).to_have_count(0)
    expect(bob.entries(audience=alice_audience)).to_have_count(0)
    foreign = [e for e in bob.entry_data() if e.get("audience") not in (bob_audience, "global")]
    assert not foreign, f"bob's window got envelopes of other audiences: {foreign}"
    assert alice_audience not in bob.seqs()

    # At the HTTP level: bob may not open alice's audience, but may open his own.
    with api_client(server, login(server.base_url, *BOB)) as client:
        with client.stream(
            "GET", "/api/events", params={"audience": alice_audience, "client_id": "bob-probe"}
        ) as response:
            assert response.status_code == 403
            response.read()
            assert alice_audience in response.json().get("audiences", [])
        with client.stream(
            "GET", "/api/events", params={"audience": bob_audience, "client_id": "bob-probe"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
    assert_no_page_errors(alice, bob)


# --------------------------------------------------------------------------
# 3. Server restart: reconnect, and replay what was missed while away
# --------------------------------------------------------------------------


def test_restart_reconnects_and_replays_changes_missed_while_away(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory, login: Login
) -> None:
    server = asgi_server_factory()
    a = open_window(server, "a", ALICE)
    b = open_window(server, "b", ALICE)
    audience = b.user_audience
    cookies = login(server.base_url, *ALICE)
    tracked = b.seqs()[audience]
    b.mark()

    # B's reconnects are held in the browser until the changes below are made,
    # so B must get them from its next connection.
    held = b.hold_event_stream()
    server.restart()
    titles = [unique("Made while B was away"), unique("Also made while B was away")]
    with api_client(server, cookies) as client:
        for title in titles:
            response = client.post(
                "/api/todos/", json={"title": title, "status": "active", "description": ""}
            )
            assert response.status_code == 201, response.text
    held.wait()
    b.expect_connection("connecting")
    for title in titles:
        expect(b.row(title)).to_have_count(0)

    held.release()
    b.expect_connection("open")
    # The server remembered B's position (in the database, across the restart):
    # the new connection starts there, so no gap and no resync.
    for title in titles:
        expect(b.row(title)).to_have_count(1)
    expect(b.entries(via="push", outcome="applied", audience=audience)).to_have_count(len(titles))
    expect(b.entries(outcome="gap")).to_have_count(0)
    assert b.page.evaluate("window.__verity.client.stats.resyncs") == 0
    assert b.seqs()[audience] == tracked + len(titles)
    assert b.marker() == 1  # no reload

    # A reconnected on its own backoff (about 1, 3, 7, 15 s after the cut, while
    # the restart takes about 2 s) and shows the current truth too.
    a.expect_connection("open", timeout=2 * WAIT_MS)
    for title in titles:
        expect(a.row(title)).to_have_count(1)
    assert_no_page_errors(a, b)


# --------------------------------------------------------------------------
# 4. verity_force_reload, from another process
# --------------------------------------------------------------------------


def test_force_reload_command_reloads_every_window(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory
) -> None:
    server = asgi_server_factory()
    windows = [open_window(server, "alice", ALICE), open_window(server, "bob", BOB)]
    for window in windows:
        window.mark()
        assert window.marker() == 1

    # The command publishes from its own process; the server's tailer picks it up
    # from the database (no Redis), and every client on "global" reloads.
    # The bound includes the command's own run (a Django start-up).
    reload_ms = 2 * WAIT_MS
    with (
        windows[0].page.expect_event("load", timeout=reload_ms),
        windows[1].page.expect_event("load", timeout=reload_ms),
    ):
        result = run_manage("verity_force_reload", env=server.env, check=True)
    assert "Sent to audience 'global'" in result.stdout

    for window in windows:
        assert window.marker() is None
        navigation = window.page.evaluate(
            "performance.getEntriesByType('navigation').map(e => e.type)"
        )
        assert navigation == ["reload"]
        window.wait_ready()  # still logged in after the reload, and live again
    assert_no_page_errors(*windows)


# --------------------------------------------------------------------------
# 5. Screenshots of the main states
# --------------------------------------------------------------------------


def test_screenshots_of_the_main_states(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory
) -> None:
    server = asgi_server_factory()
    a = open_window(server, "a", ALICE)
    b = open_window(server, "b", ALICE)
    shots: dict[str, list[Path]] = {}

    # B adds todos; A receives them as pushed directives.
    first = "Book flights for the offsite"
    b.create_todo(first, project="Work")
    b.create_todo("Renew passport", project="Home")
    b.create_todo("Plan the sprint review", project="Work")
    expect(a.row("Plan the sprint review")).to_have_count(1)
    expect(a.entries(via="push", outcome="applied")).to_have_count(3)
    shots["01-list"] = [a.screenshot("a-01-list-with-inspector"), b.screenshot("b-01-list")]

    # A toggles a todo: the pull copy is applied, the pushed copy is an echo; B follows.
    a.toggle("Buy milk")
    expect(a.row("Buy milk")).to_have_attribute("data-status", "done")
    expect(b.row("Buy milk")).to_have_attribute("data-status", "done")
    expect(a.entries(via="push", outcome="echo")).not_to_have_count(0)
    shots["02-toggle"] = [a.screenshot("a-02-after-toggle"), b.screenshot("b-02-after-toggle")]

    # A opens the detail panel; B edits the description, and A's panel follows.
    a.row(first).get_by_test_id("todo-title").click()
    detail = a.testid("detail")
    expect(detail.get_by_test_id("detail-title")).to_have_value(first)
    b.row(first).get_by_test_id("todo-title").click()
    expect(b.testid("detail-title")).to_have_value(first)  # loaded: see the next test
    description = "Two nights, leave Thursday morning. Ask Bob about the budget first."
    b.testid("detail-description").fill(description)
    b.testid("detail-save").click()
    expect(detail.get_by_test_id("detail-description")).to_have_value(description)
    expect(detail.get_by_test_id("detail-form")).not_to_have_class(re.compile(r"\bis-loading\b"))
    a_detail = a.screenshot("a-03-detail")
    shots["03-detail"] = [a_detail, b.screenshot("b-03-detail")]

    for paths in shots.values():
        for path in paths:
            assert path.stat().st_size > 10_000, path
    if os.environ.get("VERITY_UPDATE_SCREENSHOT") == "1":
        docs = REPO_ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(a_detail, docs / "demo.png")
    assert OUTPUT_DIR.is_dir()
    assert_no_page_errors(a, b)


# --------------------------------------------------------------------------
# Regressions: bugs these tests found in app.js
# --------------------------------------------------------------------------


def test_description_typed_while_the_detail_loads_is_not_lost(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory
) -> None:
    """The detail panel keeps unsaved edits over server updates (syncField), so it
    must not drop what was typed before its first data arrived either. Disabling
    the form until then fixes this too: then nothing could be typed."""
    server = asgi_server_factory()
    a = open_window(server, "a", ALICE)
    expanded = a.hold_requests(lambda url: "level=expanded" in url, "expanded todo")
    a.row("Buy milk").get_by_test_id("todo-title").click()
    expanded.wait()
    form = a.testid("detail-form")
    expect(form).to_have_class(re.compile(r"\bis-loading\b"))
    description = a.testid("detail-description")
    typed: str | None = None
    if description.is_editable():
        typed = "Typed while the detail was loading"
        description.fill(typed)
    expanded.release()
    expect(form).not_to_have_class(re.compile(r"\bis-loading\b"))
    expect(a.testid("detail-title")).to_have_value("Buy milk")
    if typed is not None:
        # The form is loaded and rendered by now; the text is there or it is gone.
        expect(description).to_have_value(typed, timeout=1_000)
        expect(a.testid("detail-save")).to_be_enabled(timeout=1_000)
    assert_no_page_errors(a)


def test_next_user_of_a_window_does_not_see_the_previous_users_envelopes(
    asgi_server_factory: AsgiServerFactory, open_window: WindowFactory
) -> None:
    """Logging out resets the cache, seqs, rows and detail panel; the envelopes
    of the user who left must not stay on screen for the next one either."""
    server = asgi_server_factory()
    window = open_window(server, "shared", ALICE)
    alice_audience = window.user_audience
    window.create_todo(unique("Alice's private todo"))
    expect(window.entries(via="push", outcome="echo", audience=alice_audience)).to_have_count(1)

    window.logout()
    window.sign_in(*BOB)
    window.wait_ready()
    assert window.user_audience != alice_audience
    # Bob's hellos are on screen by now (ready), so the list is settled.
    expect(
        window.entries(via="push", outcome="hello", audience=window.user_audience)
    ).to_have_count(1)
    expect(window.entries(audience=alice_audience)).to_have_count(0, timeout=1_000)
    expect(window.entries(via="pull")).to_have_count(0, timeout=1_000)
    assert_no_page_errors(window)


# --------------------------------------------------------------------------
# 5. A cut stream replays what it missed, filtered lists included (issue 15)
# --------------------------------------------------------------------------

FILTERS = {"{}": "", '{"status":"active"}': "?status=active", '{"status":"done"}': "?status=done"}


def cached_todo_ids(window: Window) -> dict[str, list[int]]:
    """The ids of B's cached ``todos`` lists, by params key, as the client holds them."""
    ids: dict[str, list[int]] = window.page.evaluate(
        """() => {
            const cached = window.__verity.client.debug.collections.get("todos") ?? [];
            return Object.fromEntries([...cached].map(([key, e]) => [key, e.data?.ids ?? null]));
        }"""
    )
    return {key: value for key, value in ids.items() if key in FILTERS}


def test_a_cut_stream_replays_and_every_filtered_list_is_right(
    asgi_server_factory: AsgiServerFactory,
    open_window: WindowFactory,
    browser: Browser,
    login: Login,
) -> None:
    import time

    from .proxy import CuttingProxy

    server = asgi_server_factory()
    proxy = CuttingProxy(server.port)
    a = open_window(server, "a", ALICE)
    # B talks to the server through the proxy, so its stream can be cut.
    b = Window(browser, proxy.base_url, "b")
    try:
        b.login(*ALICE)
        audience = b.user_audience
        first, second = unique("Goes done while B is away"), unique("Made while B is away")
        a.create_todo(first)
        expect(b.row(first)).to_have_count(1)
        for status in ("active", "done", "all"):
            b.filter(status)  # B now holds all three lists
        assert set(cached_todo_ids(b)) == set(FILTERS)
        b.mark()

        proxy.accepting.clear()
        assert proxy.cut() >= 1  # B's stream and any idle keep-alive connection
        b.expect_connection("connecting")
        a.toggle(first)
        expect(a.row(first).get_by_test_id("todo-toggle")).to_be_checked()
        a.create_todo(second)
        proxy.accepting.set()
        b.expect_connection("open")

        cookies = login(server.base_url, *ALICE)
        with api_client(server, cookies) as client:
            truth = {
                key: client.get(f"/api/todos/{query}").json()["ids"]
                for key, query in FILTERS.items()
            }
        deadline = time.monotonic() + WAIT_MS / 1000
        while cached_todo_ids(b) != truth and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cached_todo_ids(b) == truth
        expect(b.row(second)).to_have_count(1)

        # Replayed, not resynced: no gap, no resync, and the replay is marked.
        expect(b.entries(via="push", replayed="true", audience=audience).first).to_be_visible()
        expect(b.entries(outcome="gap")).to_have_count(0)
        assert b.page.evaluate("window.__verity.client.stats.resyncs") == 0
        assert b.seqs()[audience] == a.seqs()[audience]
        assert b.marker() == 1  # no reload
        assert_no_page_errors(a, b)
    except BaseException:
        print(b.report())
        raise
    finally:
        b.close()
        proxy.close()
