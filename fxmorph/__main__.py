"""``python -m fxmorph`` runs the ``fxmorph-export`` command line."""

import sys

from fxmorph.cli import main

sys.exit(main())
