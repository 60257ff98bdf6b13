"""The errors every layer raises for input it cannot use: a bad setting (at start) or a bad
request (at admission). Kept at the bottom so that the engine, the index, the router and the
launcher raise and catch the same types; each message names the field and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint or cluster setting that cannot work; the message names it."""


class InvalidRequestError(ValueError):
    """A request that cannot be served as given; the message says which field and why."""
