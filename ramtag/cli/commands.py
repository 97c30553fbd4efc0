"""Imports every command module so that each registers itself on the app."""

from ramtag.cli import selfcheck  # noqa: F401
