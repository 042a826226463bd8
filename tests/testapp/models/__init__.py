"""The test suite's own models, so that editing the demo never breaks a library test.

``todos`` has the shape the unit tests were written against (projects, tags,
todos owned by a user). ``board`` is the team task board the completeness
oracle drives: every kind of foreign key deletion, m2m from both sides, each
kind of audience spec, both params modes, multi-table inheritance and a
proxy registered from outside its class.
"""

from tests.testapp.models.board import (
    Board,
    Bug,
    Card,
    Column,
    Comment,
    Label,
    LabelProxy,
    Team,
    backlog_column,
)
from tests.testapp.models.todos import Project, Tag, Todo

__all__ = [
    "Board",
    "Bug",
    "Card",
    "Column",
    "Comment",
    "Label",
    "LabelProxy",
    "Project",
    "Tag",
    "Team",
    "Todo",
    "backlog_column",
]
