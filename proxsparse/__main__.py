"""``python -m proxsparse`` (and ``torchrun ... -m proxsparse prune ...``)."""

import sys

from .cli import main

sys.exit(main())
