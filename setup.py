"""The build's one step beyond pyproject.toml: the fan-out planner, compiled where it can be.

tradecopy is pure Python. Two modules, the fan-out planner's per-link loop
(``engine/replicator/fanout.py``) and its spliced batches (``engine/replicator/splice.py``),
are also compiled by Cython into extension modules, typed by the ``.pxd`` files beside them,
when the machine has a C compiler. The extensions are optional: where compiling fails (no
compiler, no Python headers), the build says so in one warning and installs the Python
modules alone, which give exactly the same results (``tests/test_fast_path.py`` runs both;
``pip install -v`` shows the warning, and the replicator logs ``planner=python``).
``TRADECOPY_PURE_PYTHON=1`` at install time skips the compilation.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

COMPILED_MODULES = ("engine.replicator.splice", "engine.replicator.fanout")


def compiled_planner() -> list[Extension]:
    if os.environ.get("TRADECOPY_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize  # a build requirement (pyproject.toml)
    except ImportError:  # a build without isolation, where Cython is not installed
        return []

    extensions = cythonize(
        [Extension(name, [name.replace(".", "/") + ".py"]) for name in COMPILED_MODULES],
        # Annotations are for type checkers; the .pxd files say what the compiler may assume.
        compiler_directives={"language_level": 3, "annotation_typing": False},
        build_dir="build/cython",
        quiet=True,
    )
    for extension in extensions:
        extension.optional = True  # a failed compilation is a warning (cythonize drops it)
    return extensions


setup(ext_modules=compiled_planner())
