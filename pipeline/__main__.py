"""``python -m pipeline <command>``: the same command line as ``raygpt``."""

import sys

from pipeline.cli import main

sys.exit(main())
