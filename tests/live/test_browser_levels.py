"""Zero refetches: a window holding a todo at every level (default, simplified,
expanded) fetches none of them again after another window edits the todo,
because the directive carries the maximal level in ``result`` and the
client's conversions satisfy every level from it.

The proof is the window's own network traffic: every GET of the item's URL
it sends after the edit is counted. Without ``result`` (the control run,
``VERITY_DEMO_RESULT=0``) the same steps refetch, which shows the count
would catch a regression.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Request, expect, sync_playwright

from liveservers.processes import require_binary

from .browser import WAIT_MS, Window, launch_chromium, unique
from .conftest import AsgiServerFactory, _test_failed

ALICE = ("alice", "alice-password")
LEVELS = ["default", "simplified", "expanded"]
SENTINEL = "/api/auth/me/?sentinel="


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
def windows(
    request: pytest.FixtureRequest, browser: Browser, asgi_server_factory: AsgiServerFactory
) -> Iterator[list[Window]]:
    opened: list[Window] = []
    yield opened
    for window in opened:
        if _test_failed(request):
            print(window.report())
        window.close()


class ItemGets:
    """GETs of one item's URL (any level) that a window sends."""

    def __init__(self, window: Window, todo_id: int) -> None:
        self.window = window
        self.pattern = re.compile(rf"/api/todos/{todo_id}/(\?|$)")
        self.urls: list[str] = []
        self.sentinels: list[str] = []
        window.page.on("request", self._seen)

    def _seen(self, request: Request) -> None:
        if request.method == "GET" and self.pattern.search(request.url):
            self.urls.append(request.url)
        if SENTINEL in request.url:
            self.sentinels.append(request.url)

    def settle(self, name: str) -> list[str]:
        """The item GETs so far, once every request the page started before now is seen.

        The page sends requests in order, so a sentinel request sent now
        arrives after any refetch the applied directive started.
        """
        self.window.page.evaluate(f"fetch('{SENTINEL}{name}')")
        waited = 0
        while not any(url.endswith(name) for url in self.sentinels):
            assert waited < WAIT_MS, "the sentinel request was never sent"
            self.window.page.wait_for_timeout(50)
            waited += 50
        return list(self.urls)


def held_levels(window: Window, todo_id: int) -> dict[str, Any]:
    held: dict[str, Any] = window.page.evaluate(
        """([id, levels]) => Object.fromEntries(levels.map(
            (l) => [l, window.__verity.client.peekItem("todo", id, l)?.data ?? null]))""",
        [todo_id, LEVELS],
    )
    return held


@pytest.mark.parametrize("with_result", [True, False], ids=["result", "control-no-result"])
def test_a_window_holding_every_level_refetches_nothing_after_an_edit(
    asgi_server_factory: AsgiServerFactory,
    browser: Browser,
    windows: list[Window],
    with_result: bool,
) -> None:
    server = asgi_server_factory({"VERITY_DEMO_RESULT": "1" if with_result else "0"})
    a, b = Window(browser, server.base_url, "a"), Window(browser, server.base_url, "b")
    windows.extend([a, b])
    a.login(*ALICE)
    b.login(*ALICE)
    title = unique("Hold every level")
    a.create_todo(title)
    expect(b.row(title)).to_have_count(1)
    todo_id = int(b.row(title).get_attribute("data-todo-id") or "0")

    # B holds the todo at every level: its row (default), the detail pane
    # (expanded), and simplified, which the page's API also serves.
    b.row(title).get_by_test_id("todo-title").click()
    expect(b.testid("detail-title")).to_have_value(title)
    b.page.evaluate("(id) => window.__verity.client.fetchItem('todo', id, 'simplified')", todo_id)
    waited = 0
    while not all(held_levels(b, todo_id).values()):
        assert waited < WAIT_MS, held_levels(b, todo_id)
        b.page.wait_for_timeout(50)
        waited += 50

    gets = ItemGets(b, todo_id)
    assert gets.settle("before") == []
    a.toggle(title)
    expect(a.row(title)).to_have_attribute("data-status", "done")
    expect(b.row(title)).to_have_attribute("data-status", "done")
    entry = b.entries(via="push", outcome="applied").filter(has_text=f"todo {todo_id}").first
    expect(entry).to_be_visible()
    refetched = gets.settle("after")

    if with_result:
        expect(entry).to_contain_text("+result")
        assert refetched == [], f"window b refetched {refetched}"
        held = held_levels(b, todo_id)
        assert all(data["status"] == "done" for data in held.values()), held
        assert "description" in held["expanded"] and "project" in held["simplified"]
    else:
        expect(entry).not_to_contain_text("+result")
        assert refetched, "without result the held levels are refetched"
        # One fetch of the widest level held covers the narrower ones.
        assert any("level=expanded" in url for url in refetched), refetched
