"""``python -m bridge.offline_model [--host H] [--port P]``."""

import sys

from .server import main

sys.exit(main())
