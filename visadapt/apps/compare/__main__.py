"""``python -m visadapt.apps.compare``: the ``visadapt-compare`` command."""
import sys

from visadapt.apps.compare.cli import main

__all__ = []

if __name__ == '__main__':
    sys.exit(main())
