"""Build glue that pyproject.toml cannot express: package discovery over two roots, and the
optional native extensions: the io_uring binding (native/uring.c -> kvstored._uring) and the
packed index (native/index.c -> kvstored._index; without it the Store uses its dict index)
and the daemon's frame parser (native/frame.c -> kvstored._frame; without it the data
sessions use FrameReader.next, the same parser in Python) and the SDK's placement
(native/placement.c -> kvstore._placement; without it kvstore.placement hashes in Python).

The binding links the system liburing (Debian: liburing-dev). It is compiled for the build
machine's baseline ISA (no -march=native), so a wheel runs on any x86-64 CPU CPython runs on.
When liburing's headers are absent the build goes on without it and the NVMe tier uses its
thread backend (kvstored/engine/nvmeio.py logs and reports that loudly). The packed index
needs only CPython's headers; it too is built for the baseline ISA, and a failed build
leaves the Store on the dict index (settings: dram.index = auto). The placement extension
links the system libxxhash (Debian: libxxhash-dev to build, libxxhash0 to run) the same way
as the binding links liburing: without its headers it is skipped.
"""
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build native extensions when possible; never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # no liburing / libxxhash headers or library
            self._skip(e, ext.name)
            self.__dict__.setdefault("skipped", set()).add(ext.name)

    def copy_extensions_to_source(self):
        """In-place builds (pip install -e) copy only what was built: a skipped extension
        must not stop the copy of those after it."""
        every = self.extensions
        self.extensions = [e for e in every if e.name not in self.__dict__.get("skipped", ())]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every

    @staticmethod
    def _skip(e, name="native extensions"):
        if os.environ.get("KVSTORE_REQUIRE_NATIVE") == "1":
            raise
        print(f"kvstored: not building {name} ({e}); the NVMe tier uses threads without "
              "_uring, the Store its dict index without _index, placement hashes in Python "
              "without _placement", file=sys.stderr)


packages = find_packages("client", include=["kvstore", "kvstore.*"]) + \
    find_packages(".", include=["kvstored", "kvstored.*"])

setup(
    packages=packages,
    package_dir={"kvstore": "client/kvstore", "kvstored": "kvstored"},
    ext_modules=[
        Extension("kvstored._uring", sources=["native/uring.c"], libraries=["uring"],
                  extra_compile_args=["-O2", "-Wall", "-fno-strict-aliasing"]),
        Extension("kvstored._index", sources=["native/index.c"],
                  extra_compile_args=["-O2", "-Wall", "-fno-strict-aliasing"]),
        Extension("kvstored._frame", sources=["native/frame.c"],
                  extra_compile_args=["-O2", "-Wall", "-fno-strict-aliasing"]),
        Extension("kvstore._placement", sources=["native/placement.c"], libraries=["xxhash"],
                  extra_compile_args=["-O2", "-Wall", "-fno-strict-aliasing"]),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
