"""``python -m vlmserve_client``: the ``vlmserve-client`` command."""

import sys

from vlmserve_client.cli import main

sys.exit(main())
