"""`python -m services.cli ...` is the `fashionchameleon` console script."""

import sys

from .main import main

sys.exit(main())
