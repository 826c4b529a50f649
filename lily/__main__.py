"""`python -m lily` is the `lily` command."""

import sys

from lily.cli import main

sys.exit(main())
