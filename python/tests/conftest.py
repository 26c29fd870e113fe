"""Puts the in-tree package on sys.path (so the tests run without installing it) and prints
the library under test. The library comes from FP4MOE_LIBRARY (CTest sets it) or build/."""
import os
import pathlib
import sys

PYTHON_DIR = pathlib.Path(__file__).resolve().parent.parent
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))


def pytest_report_header(config):
    import fp4moe
    try:
        return f"fp4moe library: {fp4moe.find_library()} (FP4MOE_LIBRARY={os.environ.get('FP4MOE_LIBRARY', '')})"
    except OSError as e:
        return f"fp4moe library: {e}"
