# SPDX-License-Identifier: MIT
"""setuptools front of pyproject.toml: builds seqmix._seqmix with CMake (target _seqmix of
python/CMakeLists.txt) and puts it into the wheel's seqmix package.

Environment: SEQMIX_CMAKE_ARGS adds CMake arguments (e.g. "-DSEQMIX_NATIVE=OFF
-DCMAKE_CXX_FLAGS=-mavx2 -mfma" for a portable build; the default compiles for this machine
with -march=native); SEQMIX_BUILD_JOBS sets the parallel build jobs (default 2)."""
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        args = [
            "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DSEQMIX_BUILD_PYTHON=ON", "-DSEQMIX_BUILD_TESTS=OFF", "-DSEQMIX_BUILD_EXAMPLES=OFF",
            "-DSEQMIX_INSTALL=OFF", f"-DPython_EXECUTABLE={sys.executable}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("SEQMIX_CMAKE_ARGS", ""))
        subprocess.check_call(["cmake", *args])
        jobs = os.environ.get("SEQMIX_BUILD_JOBS", "2")
        subprocess.check_call(["cmake", "--build", str(build), "--target", "_seqmix", "-j", jobs])
        built = next((build / "python" / "seqmix").glob("_seqmix*"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out)


setup(ext_modules=[CMakeExtension("seqmix._seqmix")], cmdclass={"build_ext": CMakeBuild})
