"""How every console script ends: bad input is one ``error:`` line and exit status 2, an interruption says how to
continue (status 130), and argparse's own exits (``--help``, a usage error it has printed) keep their status."""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Tuple, Type

__all__ = ['INPUT_ERRORS', 'exit_status']

INPUT_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError)


def exit_status(prog: str, call: Callable[[], Any], errors: Tuple[Type[BaseException], ...] = INPUT_ERRORS,
                resume_hint: Optional[str] = None) -> int:
    """Run ``call`` and return the command's exit status: what it returned when that is an int (a status), else 0;
    2 after printing ``<prog>: error: <message>`` for one of ``errors``; 130 after printing ``resume_hint`` on Ctrl-C
    (without a hint the interruption propagates)."""
    try:
        status = call()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except errors as err:
        print(f'{prog}: error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if resume_hint is None:
            raise
        print(f'{prog}: interrupted; {resume_hint}', file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0
