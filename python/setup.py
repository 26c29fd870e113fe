"""Builds libfp4moe.so with CMake from the repository root (the folder above this one) and ships
it inside the package; FP4MOE_LIBRARY=/path/to/libfp4moe.so ships that prebuilt file instead,
and FP4MOE_SKIP_LIBRARY=1 ships none (the package then needs FP4MOE_LIBRARY at run time)."""
import os
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


def _build_library():
    build = REPO / "build-wheel"
    subprocess.check_call(["cmake", "-S", str(REPO), "-B", str(build),
                           "-DCMAKE_BUILD_TYPE=Release"])
    subprocess.check_call(["cmake", "--build", str(build), "--target", "fp4moe", "-j",
                           str(os.cpu_count() or 2)])
    return build / "libfp4moe.so"


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        if os.environ.get("FP4MOE_SKIP_LIBRARY"):
            return
        prebuilt = os.environ.get("FP4MOE_LIBRARY")
        if prebuilt:
            source = pathlib.Path(prebuilt)
        elif (REPO / "CMakeLists.txt").is_file():
            source = _build_library()
        else:
            raise RuntimeError("fp4moe: no repository to build libfp4moe.so from; set "
                               "FP4MOE_LIBRARY to a prebuilt one (or FP4MOE_SKIP_LIBRARY=1)")
        target = pathlib.Path(self.build_lib) / "fp4moe" / "libfp4moe.so"
        shutil.copyfile(source.resolve(), target)


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for the platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithLibrary}, distclass=BinaryDistribution)
