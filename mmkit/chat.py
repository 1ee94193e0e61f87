"""``python -m mmkit.chat --model DIR --image PATH [--query TEXT]``: see ``mmkit.infer.chat``."""

from __future__ import annotations

import sys

from mmkit.infer.chat import main

if __name__ == "__main__":
    sys.exit(main())
