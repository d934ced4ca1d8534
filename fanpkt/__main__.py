"""`python -m fanpkt ...` is `fanpkt ...`."""
import sys

from .cli import main

sys.exit(main())
