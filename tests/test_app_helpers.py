"""What the applications share: the console scripts' ending (visadapt/apps/_command.py) and the trainers' AdamW
(visadapt/apps/_optim.py)."""
import pytest
import torch

from visadapt.apps._command import exit_status
from visadapt.apps._optim import fused_adam_kwargs


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


def test_fused_adamw_when_it_can_step_every_tensor_and_nobody_chose():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    assert fused_adam_kwargs(params) == {'fused': True}
    assert fused_adam_kwargs(params, {'foreach': False}) == {} == fused_adam_kwargs(params, {'fused': False})
    assert fused_adam_kwargs([]) == {}
    assert fused_adam_kwargs([torch.zeros(2, dtype=torch.int64)]) == {}      # not a float tensor: no fused kernel


def test_fused_adamw_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (3, 3, 2, 2)] * 5
    loop = [torch.randn(s, requires_grad=True) for s in shapes]
    fused = [p.detach().clone().requires_grad_() for p in loop]
    optimizers = [torch.optim.AdamW(loop, lr=1e-2, foreach=False, fused=False),
                  torch.optim.AdamW(fused, lr=1e-2, **fused_adam_kwargs(fused))]
    assert optimizers[1].defaults['fused'] is True
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for group, opt in zip((loop, fused), optimizers):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(loop, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
