"""``python -m data_prep ...`` is ``llp-prep ...``."""
import sys

from .cli import main

sys.exit(main())
