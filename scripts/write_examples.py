"""Regenerate the shipped examples/ folder (a dozen synthetic scenes, their vocabulary and labels).

    python scripts/write_examples.py            # rewrites examples/
    python scripts/write_examples.py /tmp/ex    # somewhere else, to compare

tests/data/test_synth.py checks that this writes the shipped files byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ramtag.data.synth_files import write_examples

if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "examples"
    for path in write_examples(folder):
        print(path)
