"""``python -m idembarrier``: the command line of `idembarrier.cli`."""

import sys

from .cli import main

sys.exit(main())
