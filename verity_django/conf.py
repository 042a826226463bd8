"""verity_django's settings: one declaration each, read live from ``settings.VERITY``.

Each setting is a :class:`Setting` on :class:`Settings`: its default, the
types it accepts, its doc, and any extra condition with its own check ID.
``conf.NAME`` reads the project's value on every access, and
:mod:`verity_django.checks` validates the same declarations, so what the
checks accept is exactly what the code reads.

The ``VERITY`` dict itself is looked up once and again after every
``setting_changed`` (``override_settings``, pytest-django's ``settings``), as
DRF's ``api_settings`` does: through ``LazySettings`` the lookup was a third
of a read, and settings are read on every save (bench W1, W4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

T = TypeVar("T")


@dataclass(frozen=True)
class Condition:
    """A constraint beyond the type, reported as its own check ID."""

    holds: Callable[[Any], bool]
    expected: str
    id: str


def _same(value: Any) -> Any:
    return value


# The project's VERITY dict (empty when it is absent or not a dict: the
# checks report that), cached until a setting changes.
_project: list[dict[str, Any]] = []


def _load_project() -> dict[str, Any]:
    found = getattr(settings, "VERITY", None)
    project = found if isinstance(found, dict) else {}
    _project[:] = [project]
    return project


def _forget_project(*, setting: str, **kwargs: Any) -> None:
    if setting == "VERITY":
        _project.clear()


setting_changed.connect(_forget_project, dispatch_uid="verity_django.conf.setting_changed")


def _imported(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # Hooks are read on every request: import_string each time was most of
    # a read (bench W1). A changed setting is a different string.
    found = _imports.get(value)
    if found is None:
        found = _imports[value] = import_string(value)
    return found


_imports: dict[str, Any] = {}


class Setting(Generic[T]):
    """One key of ``settings.VERITY``."""

    def __init__(
        self,
        default: Any,
        types: type | tuple[type, ...],
        doc: str,
        *,
        expected: str,
        condition: Condition | None = None,
        cast: Callable[[Any], T] = _same,
        importable: bool = False,
    ) -> None:
        self.default = default
        self.types = types if isinstance(types, tuple) else (types,)
        self.doc = doc
        self.expected = expected
        self.condition = condition
        self.cast = cast
        # An import string (checked for importability) or the object itself.
        self.importable = importable
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Setting[T]: ...

    @overload
    def __get__(self, instance: Settings, owner: type) -> T: ...

    def __get__(self, instance: Settings | None, owner: type) -> T | Setting[T]:
        if instance is None:
            return self
        project = _project[0] if _project else _load_project()
        value = project.get(self.name, self.default)
        return value if self.cast is _same else self.cast(value)

    def accepts_type(self, value: Any) -> bool:
        if self.importable and (isinstance(value, str) or callable(value)):
            return True
        # bool is an int to Python, never to a setting that counts something.
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


def _seconds_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _at_least_one(value: Any) -> bool:
    return bool(value >= 1)


AT_LEAST_ONE = Condition(_at_least_one, "at least 1", "verity_django.E005")
# A timeout bounds how long publishing waits on a transport that does not answer.
A_TIMEOUT = Condition(
    lambda value: 0 < value <= 60, "between 0 (excluded) and 60 seconds", "verity_django.E011"
)


class Settings:
    ENABLED = Setting[bool](
        True, bool, "Master switch: when False no directive is produced.", expected="a bool"
    )
    PUSH = Setting[bool](
        True, bool, "Publish envelopes over Server-Sent Events after commit.", expected="a bool"
    )
    ALWAYS_INCLUDE_IN_RESPONSES = Setting[bool](
        False,
        bool,
        "Inject directives into responses even when the request did not ask for them.",
        expected="a bool",
    )
    INJECT_DRF_RESPONSES = Setting[bool](
        True,
        bool,
        "Inject into every DRF response; False limits injection to DirectivesMixin views.",
        expected="a bool",
    )
    CLIENT_ID_HEADERS = Setting[Sequence[str]](
        ("X-Verity-Client-ID", "X-Client-ID"),
        (list, tuple),
        "Request headers that name the client id, which becomes the directives' source.",
        expected="a list or tuple of header names",
    )
    COLLAPSE_THRESHOLD = Setting[int](
        100,
        int,
        "Past this many refresh_item of one name in a batch, refresh collections instead.",
        expected="an int",
        condition=AT_LEAST_ONE,
    )
    RESULT_MAX_BYTES = Setting[int](
        16 * 1024,
        int,
        "A larger result payload is dropped (and logged): the client refetches instead.",
        expected="an int",
        condition=AT_LEAST_ONE,
    )
    CHANNEL_PREFIX = Setting[str](
        "verity.",
        str,
        "django-eventstream channel name = this prefix + the audience.",
        expected="a str",
    )
    AUTHORIZE = Setting[Callable[[Any, str], bool]](
        "verity_django.audiences.default_authorize",
        (),
        "(user, audience) -> bool: who may read an audience.",
        expected="an import string or a callable",
        cast=_imported,
        importable=True,
    )
    USER_AUDIENCES = Setting[Callable[[Any], list[str]]](
        "verity_django.audiences.default_user_audiences",
        (),
        "user -> [audience]: the user's own audiences (AUTO_SUBSCRIBE_USER_AUDIENCES).",
        expected="an import string or a callable",
        cast=_imported,
        importable=True,
    )
    GLOBAL_REQUIRES_AUTHENTICATION = Setting[bool](
        False, bool, "Anonymous users may not read the global audience.", expected="a bool"
    )
    AUTO_SUBSCRIBE_USER_AUDIENCES = Setting[bool](
        False, bool, "Add the user's own audiences to every SSE connection.", expected="a bool"
    )
    MAX_AUDIENCES_PER_CONNECTION = Setting[int](
        10,
        int,
        "A connection asking for more audiences gets a 400.",
        expected="an int",
        condition=AT_LEAST_ONE,
    )
    AUDIENCE_PARAM = Setting[str](
        "audience", str, "Query parameter naming an audience.", expected="a str"
    )
    CLIENT_ID_PARAM = Setting[str](
        "client_id", str, "Query parameter naming the client id.", expected="a str"
    )
    POLL_INTERVAL = Setting[float](
        0.25,
        (int, float),
        "Seconds between checks for envelopes stored by other processes.",
        expected="a number of seconds",
        cast=float,
        # Envelopes from other processes should arrive within a second or so.
        condition=Condition(
            lambda value: 0 < value <= 5, "between 0 (excluded) and 5", "verity_django.E006"
        ),
    )
    EVENT_RETENTION = Setting[int](
        24 * 60 * 60,
        int,
        "Seconds a published envelope stays replayable.",
        expected="an int",
        condition=AT_LEAST_ONE,
    )
    REAUTHORIZE_INTERVAL = Setting[float | None](
        None,
        (int, float, type(None)),
        "Seconds after which every live stream is authorized again; None: only revoke() "
        "and logout cut streams.",
        expected="None or a number of seconds",
        cast=_seconds_or_none,
        # Every round asks AUTHORIZE again for every open stream.
        condition=Condition(
            lambda value: value is None or value >= 1,
            "None (off) or at least 1 second",
            "verity_django.E007",
        ),
    )
    REPLAY_RETENTION = Setting[float](
        5 * 60,
        (int, float),
        "Seconds a client's stream position is remembered after its stream last wrote; "
        "a reconnect within it replays what the client missed. 0 turns replay off.",
        expected="a number of seconds",
        cast=float,
        # Past the client's idempotency memory (5 minutes) a replay re-applies
        # what it had applied; past an hour it is a resync in disguise.
        condition=Condition(
            lambda value: 0 <= value <= 3600, "between 0 and 3600", "verity_django.E008"
        ),
    )
    REPLAY_MARGIN = Setting[float](
        10.0,
        (int, float),
        "Seconds before a reconnect whose envelopes are sent again, in case they were "
        "written to a connection that was already cut.",
        expected="a number of seconds",
        cast=float,
        condition=Condition(
            lambda value: 0 < value <= 300, "between 0 (excluded) and 300", "verity_django.E009"
        ),
    )

    PUBLISH_INLINE = Setting[bool](
        True,
        bool,
        "The committing thread stores and sends its own envelopes when no other thread "
        "is publishing and the transports are healthy, unless it publishes back to back "
        "into Redis (then the publisher thread stores them in runs); False leaves all of "
        "it to the process's publisher thread (inside a TestCase publishing is always "
        "inline).",
        expected="a bool",
    )
    BACKLOG_LIMIT = Setting[int](
        10_000,
        int,
        "Envelopes waiting to be published, per process; past it the oldest are dropped.",
        expected="an int",
        condition=AT_LEAST_ONE,
    )
    STORAGE_TIMEOUT = Setting[float](
        1.0,
        (int, float),
        "Seconds an append waits for the database's write lock (SQLite busy timeout, "
        "PostgreSQL lock and statement timeouts); on PostgreSQL, also the lock and "
        "statement timeouts of the reader threads' storage reads. A storage read still "
        "unanswered after this and as long again (at least a second more) is given up on.",
        expected="a number of seconds",
        cast=float,
        condition=A_TIMEOUT,
    )
    REDIS_TIMEOUT = Setting[float](
        1.0,
        (int, float),
        "Connect and socket timeout, in seconds, of the Redis storage's client and of "
        "the envelope subscription, which is replaced once a PING goes unanswered this long.",
        expected="a number of seconds",
        cast=float,
        condition=A_TIMEOUT,
    )
    GRIP_TIMEOUT = Setting[float](
        1.0,
        (int, float),
        "Seconds a GRIP publish (a POST to the proxy's control URL) may take.",
        expected="a number of seconds",
        cast=float,
        condition=A_TIMEOUT,
    )
    FLUSH_TIMEOUT = Setting[float](
        5.0,
        (int, float),
        "Seconds an exiting process (or a management command) waits for its envelopes.",
        expected="a number of seconds",
        cast=float,
        condition=A_TIMEOUT,
    )


def declared() -> dict[str, Setting[Any]]:
    """Every setting, by name, in declaration order."""
    return {name: value for name, value in vars(Settings).items() if isinstance(value, Setting)}


conf = Settings()

__all__ = ["Condition", "Setting", "Settings", "conf", "declared"]
