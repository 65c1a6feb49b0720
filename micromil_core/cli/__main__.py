"""``python -m micromil_core.cli``: the ``micromil`` command."""

import sys

from micromil_core.cli import main

sys.exit(main())
