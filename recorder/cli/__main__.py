"""``python -m recorder.cli ...`` is ``k2eg-recorder ...``."""

import sys

from recorder.cli import main

sys.exit(main())
