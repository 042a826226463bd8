"""Playwright helpers for the demo page's browser tests (test_browser.py).

A ``Window`` is one browser context (its own cookies, so its own session and
its own Verity client id) with one page on the demo. Its helpers read the
page only through the test hooks the demo exposes: ``data-testid``
attributes, the inspector entries' ``data-*`` attributes,
``document.body.dataset.ready`` and ``window.__verity``.

Every wait is bounded by ``WAIT_MS``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from playwright.sync_api import Browser, Locator, Page, Playwright, Route, ViewportSize, expect

from liveservers.processes import REPO_ROOT

WAIT_MS = 10_000
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
OUTPUT_DIR = REPO_ROOT / "test-output" / "browser"

# The default for every expect() here and in the tests (Playwright's is 5 s).
expect.set_options(timeout=WAIT_MS)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

Status = Literal["all", "active", "done"]


def launch_chromium(playwright: Playwright, executable: str) -> Browser:
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)


def unique(title: str) -> str:
    """A title no other test (or earlier run against the same page) can have."""
    return f"{title} {uuid.uuid4().hex[:6]}"


def is_events_url(url: str) -> bool:
    return urlsplit(url).path.rstrip("/") == "/api/events"


def _attribute_selector(attrs: dict[str, str | int]) -> str:
    parts = []
    for key, value in attrs.items():
        name = "data-" + key.replace("_", "-")
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'[{name}="{text}"]')
    return "".join(parts)


class Window:
    """One browser window (context + page) on the demo, logged in or not."""

    def __init__(self, browser: Browser, base_url: str, name: str) -> None:
        self.name = name
        self.base_url = base_url
        self.context = browser.new_context(base_url=base_url, viewport=VIEWPORT)
        self.context.set_default_timeout(WAIT_MS)
        self.context.set_default_navigation_timeout(WAIT_MS)
        self.page: Page = self.context.new_page()
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.page.on(
            "console", lambda message: self.console.append(f"{message.type}: {message.text}")
        )
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def close(self) -> None:
        self.context.close()

    # -- session ---------------------------------------------------------

    def login(self, username: str, password: str) -> None:
        self.page.goto("/")
        self.sign_in(username, password)

    def sign_in(self, username: str, password: str) -> None:
        """Fill in and submit the login form the page shows."""
        form = self.testid("login-form")
        form.locator("input[name=username]").fill(username)
        form.locator("input[name=password]").fill(password)
        form.locator("button[type=submit]").click()
        self.wait_ready()

    def wait_ready(self) -> None:
        """The first list render after login is done, the hellos arrived, the stream is open."""
        expect(self.page.locator("body")).to_have_attribute("data-ready", "1", timeout=WAIT_MS)
        self.expect_connection("open")

    def expect_connection(self, state: str, timeout: float = WAIT_MS) -> None:
        expect(self.testid("connection")).to_have_attribute("data-state", state, timeout=timeout)

    @property
    def audiences(self) -> list[str]:
        audiences: list[str] = self.page.evaluate("window.__verity.client.audiences")
        return audiences

    @property
    def user_audience(self) -> str:
        return next(a for a in self.audiences if a.startswith("user-"))

    @property
    def user_id(self) -> int:
        return int(self.user_audience.removeprefix("user-"))

    @property
    def client_id(self) -> str:
        client_id: str = self.page.evaluate("window.__verity.clientId")
        return client_id

    def seqs(self) -> dict[str, int]:
        """The client's tracked seq per audience."""
        seqs: dict[str, int] = self.page.evaluate("window.__verity.client.seqs")
        return seqs

    def mark(self) -> None:
        """Put a marker on ``window`` that only a reload or navigation removes."""
        self.page.evaluate("window.__marker = 1")

    def marker(self) -> Any:
        return self.page.evaluate("window.__marker")

    # -- locators ----------------------------------------------------------

    def testid(self, test_id: str) -> Locator:
        return self.page.get_by_test_id(test_id)

    def rows(self) -> Locator:
        return self.testid("todo-list").get_by_test_id("todo-row")

    def row(self, title: str) -> Locator:
        """The row whose title is exactly ``title``."""
        title_el = self.page.get_by_test_id("todo-title").filter(
            has_text=re.compile(f"^{re.escape(title)}$")
        )
        return self.rows().filter(has=title_el)

    def titles(self) -> list[str]:
        titles: list[str] = (
            self.testid("todo-list").get_by_test_id("todo-title").all_text_contents()
        )
        return titles

    def entries(self, **attrs: str | int) -> Locator:
        """Inspector entries, newest first, whose ``data-*`` match ``attrs`` (``via="push"``)."""
        return self.page.locator(f'[data-testid="inspector-entry"]{_attribute_selector(attrs)}')

    def entry_data(self) -> list[dict[str, str]]:
        """Every inspector entry's ``data-*`` attributes and text, newest first."""
        data: list[dict[str, str]] = self.page.eval_on_selector_all(
            '[data-testid="inspector-entry"]',
            "els => els.map(e => ({...e.dataset, text: e.innerText}))",
        )
        return data

    # -- actions -----------------------------------------------------------

    def filter(self, status: Status) -> None:
        self.testid(f"filter-{status}").click()
        expect(self.testid(f"filter-{status}")).to_have_attribute("aria-pressed", "true")
        # The filtered collection is loaded (fetched or from the cache).
        params = "(all)" if status == "all" else f'status="{status}"'
        expect(self.page.locator("#collection-meta")).to_contain_text(
            f"collection todos {params} ·"
        )

    def create_todo(self, title: str, project: str | None = None) -> None:
        form = self.testid("new-todo")
        form.locator("input[name=title]").fill(title)
        if project is not None:
            form.locator("select[name=project]").select_option(label=project)
        form.locator("button[type=submit]").click()
        expect(self.row(title)).to_have_count(1)
        # The form clears once the POST succeeded.
        expect(form.locator("input[name=title]")).to_have_value("")

    def logout(self) -> None:
        self.testid("logout").click()
        expect(self.testid("login-form")).to_be_visible()

    def toggle(self, title: str) -> None:
        self.row(title).get_by_test_id("todo-toggle").click()

    # -- holding requests ----------------------------------------------------

    def hold_requests(self, match: Callable[[str], bool], what: str) -> HeldRequests:
        """From now on, keep every new request whose URL ``match``es pending (unsent)."""
        return HeldRequests(self, match, what)

    def hold_event_stream(self) -> HeldRequests:
        return self.hold_requests(is_events_url, "/api/events")

    # -- diagnostics ---------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        path = OUTPUT_DIR / f"{name}.png"
        self.page.screenshot(path=str(path), animations="disabled", caret="hide")
        return path

    def report(self) -> str:
        """What a failing test prints about this window."""
        lines = [f"--- window {self.name} ({self.page.url}) ---"]
        try:
            lines.append(f"connection: {self.testid('connection').get_attribute('data-state')}")
            lines.append(f"seqs: {self.seqs()}")
            lines.append(f"titles: {self.titles()}")
            lines.extend(
                "entry: " + " ".join(f"{k}={v!r}" for k, v in entry.items() if k != "text")
                for entry in self.entry_data()[:40]
            )
        except Exception as exc:  # the page may be gone; the rest is still worth printing
            lines.append(f"(page state unavailable: {exc})")
        lines.extend(f"console {line}" for line in self.console[-60:])
        lines.extend(f"pageerror {line}" for line in self.page_errors)
        return "\n".join(lines)


class HeldRequests:
    """A page's requests matching ``match``, held in the browser until ``release()``."""

    def __init__(self, window: Window, match: Callable[[str], bool], what: str) -> None:
        self.window = window
        self.match = match
        self.what = what
        self.routes: list[Route] = []
        self._active = True
        window.page.route(match, self._hold)

    def _hold(self, route: Route) -> None:
        self.routes.append(route)

    def wait(self) -> None:
        """Wait (bounded) until at least one request is held."""
        waited = 0
        while not self.routes:
            if waited >= WAIT_MS:
                raise AssertionError(f"{self.window.name}: no {self.what} request in {WAIT_MS} ms")
            self.window.page.wait_for_timeout(50)  # also lets route events dispatch
            waited += 50

    def release(self) -> None:
        """Send the held requests on and stop holding new ones."""
        routes, self.routes = self.routes, []
        # Continue first: removing the route lets pending requests go on unhandled.
        for route in routes:
            route.continue_()
        if self._active:
            self._active = False
            self.window.page.unroute(self.match, self._hold)
