"""`python -m logra.cli`: the `logra` command."""

import sys

from logra.cli.main import main

sys.exit(main())
