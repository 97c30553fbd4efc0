"""Imports every command module so that each registers itself on the app."""

from ramtag.cli import selfcheck  # noqa: F401
from ramtag.cli import tag as _tag  # noqa: F401
from ramtag.cli import vocab as _vocab  # noqa: F401
from ramtag.cli import eval as _eval  # noqa: F401
