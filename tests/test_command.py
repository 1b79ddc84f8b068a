"""The console scripts' shared ending (visadapt/apps/_command.py)."""
import pytest

from visadapt.apps._command import exit_status


def _raise(err):
    def call():
        raise err
    return call


def test_bad_input_is_one_error_line_and_status_2(capsys):
    assert exit_status('visadapt-x', _raise(ValueError("rank 0 is not valid; use r >= 1"))) == 2
    assert capsys.readouterr().err == 'visadapt-x: error: rank 0 is not valid; use r >= 1\n'
    with pytest.raises(TypeError):                 # not an input error of this command: a bug, with its traceback
        exit_status('visadapt-x', _raise(TypeError('bug')))


def test_status_from_the_call_argparse_and_interruptions(capsys):
    assert exit_status('visadapt-x', lambda: {'accuracy': 0.5}) == 0
    assert exit_status('visadapt-x', lambda: 1) == 1
    assert exit_status('visadapt-x', _raise(SystemExit(2))) == 2
    assert exit_status('visadapt-x', _raise(SystemExit(None))) == 0
    assert exit_status('visadapt-x', _raise(KeyboardInterrupt()), resume_hint='run it again') == 130
    assert capsys.readouterr().err == 'visadapt-x: interrupted; run it again\n'
    with pytest.raises(KeyboardInterrupt):
        exit_status('visadapt-x', _raise(KeyboardInterrupt()))
