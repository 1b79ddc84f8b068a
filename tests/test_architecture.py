"""The layout holds: no import cycles, layers import only the layers above them, every module imports on its own,
every console script answers ``--help``, and adding a method needs nothing but ``@register``.

The import graph is read from the source (``ast``), function-level imports included, so a cycle hidden inside a
function is found too. An edge goes to the module an import statement names (``from .x import y`` → ``x``, or ``x.y``
when ``y`` is a submodule); importing a submodule also runs its parent package, which is not counted as an edge (a
package's ``__init__`` importing its own children is not a cycle).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

import visadapt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'visadapt')


def _modules() -> Dict[str, str]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
                out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> Set[str]:
    """Package modules ``name`` imports anywhere in its file."""
    is_package = path.endswith('__init__.py')
    base = name.split('.') if is_package else name.split('.')[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = '.'.join(base[:len(base) - node.level + 1]) if node.level else ''
            target = '.'.join(p for p in (parent, node.module or '') if p)
            found.add(target)
            found.update(f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in MODULES)
    deps = set()
    for target in found:
        while target and target not in MODULES:  # `import visadapt.core.io as x` names a module; strip attributes
            target = target.rpartition('.')[0]
        if target and target != name:
            deps.add(target)
    return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_is_read_and_cycles_are_detected():
    assert 'visadapt.core.layer' in GRAPH['visadapt.core.attention']  # a known edge is seen
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def _layer(name: str) -> str:
    parts = name.split('.')
    return parts[1] if len(parts) > 1 else 'root'


def test_core_imports_no_method_integration_or_application():
    for name, deps in GRAPH.items():
        if _layer(name) == 'core':
            bad = [d for d in deps if _layer(d) in ('methods', 'integrations', 'apps', 'root')]
            assert not bad, f'{name} imports {bad}'


def test_methods_import_only_the_core_and_methods():
    for name, deps in GRAPH.items():
        if _layer(name) == 'methods':
            bad = [d for d in deps if _layer(d) not in ('core', 'methods')]
            assert not bad, f'{name} imports {bad}'


def test_integrations_use_only_the_core_public_api():
    for name, deps in GRAPH.items():
        if _layer(name) == 'integrations':
            bad = [d for d in deps if d.startswith('visadapt.core.') or _layer(d) in ('methods', 'apps')
                   or d == 'visadapt']
            assert not bad, f'{name} imports {bad}: integrations import `visadapt.core` (its public API) only'


def test_every_module_has_an_explicit_all():
    missing = [name for name, path in MODULES.items()
               if not name.split('.')[-1].startswith('_') and name != 'visadapt.apps' and name != 'visadapt.integrations'
               and '__all__' not in open(path, encoding='utf-8').read()]
    assert not missing, missing


_IMPORT_EACH = '''
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == 'visadapt' or m.startswith('visadapt.')]:
        del sys.modules[loaded]  # each module imports with no visadapt module loaded before it
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ': ' + traceback.format_exc(limit=3))
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
'''


def test_every_module_imports_on_its_own():
    """Each module imports alone (no visadapt module loaded before it), so no import depends on an earlier one."""
    proc = subprocess.run([sys.executable, '-c', _IMPORT_EACH, *sorted(MODULES)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _console_scripts() -> Dict[str, str]:
    import tomllib
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)['project']['scripts']


@pytest.mark.parametrize('script', sorted(_console_scripts()))
def test_console_script_help(script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    assert os.path.isfile(path), f'{script} is not installed next to {sys.executable} (pip install -e .)'
    proc = subprocess.run([path, '--help'], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'usage:' in proc.stdout


#: what the extras install (pyproject.toml); the core needs none of them
EXTRA_PACKAGES = ('timm', 'diffusers', 'transformers', 'accelerate', 'peft', 'datasets', 'open_clip', 'open_clip_train',
                  'mmengine', 'mmdet', 'mmseg', 'mmcv', 'lycoris', 'bitsandbytes', 'matplotlib', 'tensorboard')


@pytest.mark.parametrize('script', sorted(_console_scripts()))
def test_console_script_help_needs_no_extra(script):
    """``--help`` with every extra's packages unimportable (as in a virtual environment with the core alone)."""
    target = _console_scripts()[script]
    module, func = target.split(':')
    code = (f'import sys\nfor name in {EXTRA_PACKAGES!r}:\n    sys.modules[name] = None\n'
            f'from {module} import {func}\nsys.exit({func}(["--help"]))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'usage:' in proc.stdout


def test_console_scripts_are_the_applications():
    apps = {name.rsplit('.', 1)[-1] for name in MODULES if name.startswith('visadapt.apps.')}
    targets = {target.split(':')[0].rsplit('.', 1)[-1] for target in _console_scripts().values()}
    assert targets <= apps
    assert all(target.startswith('visadapt.apps.') for target in _console_scripts().values())


def test_registration_is_the_only_step(tmp_path):
    """A new method file with ``@register`` is found, gets a top-level name, parses from a spec and injects."""
    code = '''
import torch, torch.nn as nn
from dataclasses import dataclass
from visadapt.core import Adapter, AdapterConfig, register

@dataclass
class ToyConfig(AdapterConfig):
    method = 'Toy'

@register(ToyConfig)
class ToyAdapter(Adapter):
    def __init__(self, config, site, weight):
        super().__init__(config, site, weight)
        self.d = nn.Parameter(torch.zeros(site.weight_shape))

    def delta_weight(self):
        return self.d
'''
    import shutil
    shutil.copytree(PACKAGE, tmp_path / 'visadapt', ignore=shutil.ignore_patterns('__pycache__'))
    (tmp_path / 'visadapt' / 'methods' / 'toy.py').write_text(code)  # one new file, no other edit
    check = ('import torch.nn as nn, visadapt; assert visadapt.__file__.startswith(sys.argv[1]); '
             'assert visadapt.ToyConfig is visadapt.get_config_class("toy") and "ToyConfig" in visadapt.__all__; '
             'model = nn.Sequential(nn.Linear(3, 3)); '
             'r = visadapt.inject(model, visadapt.parse_adapter_spec({"type": "Toy"})); assert r.adapter_params == 9')
    proc = subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); ' + check,
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_top_level_names_come_from_the_registry():
    for cls in visadapt.METHODS.values():
        assert getattr(visadapt, cls.__name__) is cls and cls.__name__ in visadapt.__all__
    assert not any(name.endswith('Adapter') and name != 'Adapter' for name in dir(visadapt))  # no star-import leak
