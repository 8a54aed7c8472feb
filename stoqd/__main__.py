"""``python -m stoqd``: the daemon, as the ``stoqd`` command."""

import sys

from .cli import daemon_main

sys.exit(daemon_main())
