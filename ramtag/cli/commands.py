"""Imports every command module so that each registers itself on the app."""

# Registration order is the order `ramtag --help` lists the commands in: not alphabetical.
# ruff: noqa: I001

from ramtag.cli import selfcheck  # noqa: F401
from ramtag.cli import tag as _tag  # noqa: F401
from ramtag.cli import vocab as _vocab  # noqa: F401
from ramtag.cli import eval as _eval  # noqa: F401
from ramtag.cli import data as _data  # noqa: F401
from ramtag.cli import model as _model  # noqa: F401
from ramtag.cli import train as _train  # noqa: F401
from ramtag.cli import explain as _explain  # noqa: F401
