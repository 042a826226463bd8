"""A team task board, the models the completeness oracle drives.

Who may see what (the oracle spells the same out on its own, from these
semantics, in tests/test_completeness.py):

- a team is seen by the operators (``team-ops``) and by its own members;
- a board, its cards and their comments by the team that owns the board;
- a card also by its assignee and by its board's lead, a comment also by
  its author;
- labels and columns by everybody.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

import verity_django
from verity_django.querysets import DirectiveManager
from verity_django.rules import RefreshCollection, RefreshItem

OPERATORS = verity_django.Audience("team-ops")


def team_itself(team: Team) -> str:
    return f"team-{team.pk}"


def comment_author(comment: Comment) -> str:
    # A callable reads only the row itself: what it read further up could not
    # be told when that changed. The team comes from a path (two hops).
    return f"user-{comment.author_id}"


class Team(models.Model):
    name = models.CharField(max_length=100)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [RefreshItem("team"), RefreshCollection("teams")]
        directive_audience = [OPERATORS, team_itself]

    def __str__(self) -> str:
        return self.name


class Board(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="boards")
    name = models.CharField(max_length=100)
    # Its cards' readers too: deleting the lead changes who reads them.
    lead = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="led_boards",
    )

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [RefreshItem("board"), RefreshCollection("boards", params=["team"])]
        directive_audience = "team"

    def __str__(self) -> str:
        return self.name


class Column(models.Model):
    name = models.CharField(max_length=50)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [RefreshItem("column"), RefreshCollection("columns")]
        directive_audience = "global"

    def __str__(self) -> str:
        return self.name


def backlog_column() -> Any:
    """Where cards go when their column is deleted (``SET_DEFAULT``)."""
    return Column.objects.get_or_create(name="backlog")[0].pk


class Label(models.Model):
    name = models.CharField(max_length=50)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [RefreshItem("label"), RefreshCollection("labels")]
        directive_audience = "global"

    def __str__(self) -> str:
        return self.name


class LabelProxy(Label):
    """The same rows through another class, registered from outside it."""

    objects = DirectiveManager()

    class Meta:
        proxy = True

    def __str__(self) -> str:
        return f"{self.name} (proxy)"


verity_django.register(
    LabelProxy,
    directives=[RefreshItem("label"), RefreshCollection("labels")],
    audience="global",
)


class Card(models.Model):
    class Status(models.TextChoices):
        TODO = "todo"
        DOING = "doing"
        DONE = "done"

    board = models.ForeignKey(Board, on_delete=models.CASCADE, related_name="cards")
    title = models.CharField(max_length=100)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.TODO)
    priority = models.IntegerField(default=0)
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assigned_cards",
    )
    column = models.ForeignKey(
        Column, default=backlog_column, on_delete=models.SET_DEFAULT, related_name="cards"
    )
    labels = models.ManyToManyField(Label, blank=True, related_name="cards")

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [
            RefreshItem("card"),
            RefreshCollection("cards", on=["create", "delete"]),
            RefreshCollection("cards", params=["board"]),
            RefreshCollection("cards", params=["status"], mode="contains"),
            RefreshCollection("cards", params=["assignee"], mode="contains"),
            RefreshItem("board", id="board", collection="boards"),
        ]
        directive_audience = ["assignee", "board__team", "board__lead"]
        directive_relations = ["labels"]

    def __str__(self) -> str:
        return self.title


class Bug(Card):
    """Multi-table inheritance: every bug is also a card."""

    severity = models.IntegerField(default=1)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [
            RefreshItem("bug"),
            RefreshCollection("bugs", on=["create", "delete"]),
            RefreshCollection("bugs", params=["severity"]),
        ]
        directive_audience = ["assignee", "board__team", "board__lead"]
        directive_relations = ["labels"]

    def __str__(self) -> str:
        return f"{self.title} (severity {self.severity})"


class Comment(models.Model):
    card = models.ForeignKey(Card, on_delete=models.CASCADE, related_name="comments")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="card_comments"
    )
    body = models.CharField(max_length=200)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [RefreshItem("comment"), RefreshCollection("comments", params=["card"])]
        directive_audience = ["card__board__team", comment_author]

    def __str__(self) -> str:
        return self.body
