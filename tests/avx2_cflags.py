"""A pytest plugin that builds the few-row kernels for AVX2 (`-march=haswell -mno-avx512f`: 8-lane
vectors, 2-row tiles) instead of for this CPU, so an AVX-512 machine tests the AVX2 code too:

    python -m pytest -p tests.avx2_cflags tests/test_kernels.py tests/test_compiled_layers.py

The libraries are cached under their own key (the flags are part of it).
"""

AVX2_FLAGS = ("-march=haswell", "-mno-avx512f")


def pytest_configure(config):
    from specframe import kernels
    from specframe.kernels import build

    flags = tuple(flag for flag in build.CFLAGS if not flag.startswith("-march=")) + AVX2_FLAGS
    build.CFLAGS = kernels.CFLAGS = flags
    build.library.cache_clear()
