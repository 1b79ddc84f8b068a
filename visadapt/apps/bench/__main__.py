"""``python -m visadapt.apps.bench`` = ``visadapt-bench``."""
import sys

from .cli import main

__all__ = ['main']

if __name__ == '__main__':
    sys.exit(main())
