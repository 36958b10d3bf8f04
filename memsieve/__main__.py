"""``python -m memsieve`` is the ``memsieve`` command."""

import sys

from memsieve.cli import main

sys.exit(main())
