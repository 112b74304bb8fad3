"""``python -m napari_mil.cli``."""

import sys

from napari_mil.cli import main

sys.exit(main())
