"""``python -m smsbat_tracker.webhook``: serve the receiver."""

import sys

from smsbat_tracker.webhook.serve import main

sys.exit(main())
