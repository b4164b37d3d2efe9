"""`python -m maskmint`: the maskmint command."""

import sys

from maskmint.launch import main

sys.exit(main())
