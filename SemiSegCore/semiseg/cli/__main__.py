"""``python -m semiseg.cli ...``: the same as the ``semiseg`` console command."""
import sys

from . import main

sys.exit(main())
