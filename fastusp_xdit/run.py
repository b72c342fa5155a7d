"""``python -m fastusp_xdit.run`` (the name the README gave before the applications moved to
:mod:`fastusp_xdit.apps`): the same as ``python -m fastusp_xdit.apps.run``."""
import sys

from .apps.run import main

if __name__ == "__main__":
    sys.exit(main())
