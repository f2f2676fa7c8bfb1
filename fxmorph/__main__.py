"""``python -m fxmorph`` runs the ``fxmorph-export`` command line."""

import sys

from fxmorph.cli.main import main

sys.exit(main())
