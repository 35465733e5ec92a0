"""``python -m worker``: the same as the ``assistant-worker`` command."""

import sys

from worker.cli.main import main

sys.exit(main())
