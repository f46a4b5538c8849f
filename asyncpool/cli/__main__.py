"""``python -m asyncpool.cli``: the same as the ``asyncpool`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
