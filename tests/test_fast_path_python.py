"""The fan-out planner's properties, once more, on its Python source.

Where a C compiler was there at install time, ``engine.replicator.fanout`` and ``.splice`` are
the compiled modules (``setup.py``). This file loads both from their ``.py`` source and runs
every test of ``test_fast_path.py`` on them, so the compiled planner and the Python fallback
are each proven equal to the reference, byte for byte, on the same random links, events and
views. Where nothing was compiled the installed planner is the source already, and
``test_fast_path.py`` alone covers it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

import engine.replicator
from engine.replicator import fanout as installed_fanout
from engine.replicator import splice as installed_splice

PACKAGE = Path(installed_fanout.__file__).parent
NAMES = ("engine.replicator.splice", "engine.replicator.fanout")


def _from_source(name: str) -> ModuleType:
    path = PACKAGE / (name.rpartition(".")[2] + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The next module's imports find this one, by either path (`import a.b`, `from a import b`).
    sys.modules[name] = module
    setattr(engine.replicator, name.rpartition(".")[2], module)
    spec.loader.exec_module(module)
    return module


def _tests_on_source() -> dict[str, object]:
    """``test_fast_path``'s tests, with the planner modules loaded from source under their own
    names while that module imports them; the installed modules are put back after."""
    saved = {name: sys.modules[name] for name in NAMES}
    try:
        modules = [_from_source(name) for name in NAMES]
        assert not any(getattr(m, "COMPILED", False) for m in modules)
        spec = importlib.util.spec_from_file_location(
            "test_fast_path_on_source", Path(__file__).with_name("test_fast_path.py")
        )
        assert spec is not None and spec.loader is not None
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
    finally:
        sys.modules.update(saved)
        for name, module in saved.items():
            setattr(engine.replicator, name.rpartition(".")[2], module)
    assert tests.fanout is modules[1] and tests.Batches is modules[0].Batches
    return {name: value for name, value in vars(tests).items() if name.startswith("test_")}


if installed_fanout.COMPILED:
    globals().update(_tests_on_source())


def test_the_planner_is_compiled_where_it_was_built_and_matches_its_source() -> None:
    """The compiled modules are what runs wherever they were built (always under CI, which
    has a compiler), and an editable install's build is not older than the source beside it:
    a planner edited since would otherwise run its old compiled code."""
    compiled = sorted(PACKAGE.glob("fanout.*.so")) + sorted(PACKAGE.glob("splice.*.so"))
    if os.environ.get("CI"):
        assert installed_fanout.COMPILED, "CI has a C compiler: the planner should be compiled"
    assert bool(compiled) == installed_fanout.COMPILED
    assert installed_splice.__file__.endswith(".py") != installed_fanout.COMPILED
    if not installed_fanout.COMPILED:
        pytest.skip("the planner runs from its Python source (no compiler at install time)")
    built = min(path.stat().st_mtime for path in compiled)
    for source in ("fanout.py", "fanout.pxd", "splice.py", "splice.pxd"):
        assert (PACKAGE / source).stat().st_mtime <= built, (
            f"{source} changed after the compiled planner was built: run the install again "
            "(pip install -c requirements.lock -e '.[dev]')"
        )
