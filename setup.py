"""The runtime's one native piece, ``runtime/_fill.c`` (everything else is in pyproject.toml).
Optional: without a C compiler the install goes on, and ``predict`` fills its buffers in
numpy instead (slower at small batches, the same results)."""

import numpy
from setuptools import Extension, setup

setup(ext_modules=[Extension("dlrmc.runtime._fill", ["runtime/_fill.c"],
                             include_dirs=[numpy.get_include()], optional=True)])
