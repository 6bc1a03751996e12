"""Build hook: compile canarymw's optional C speedups into the wheel.

The extension only speeds up the adapters' per-request paths; canarymw/wsgi.py and
canarymw/asgi.py have the same behaviour in Python. When no C compiler is available the build warns and
produces a pure-Python wheel instead of failing. ``CANARYMW_NO_EXTENSIONS=1`` skips
the compilation on purpose.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = "src/canarymw/_speedups.c"


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("CANARYMW_NO_EXTENSIONS"):
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                built = self._compile(Path(tmp))
            except Exception as exc:  # any compiler or toolchain failure: fall back to Python
                self.app.display_warning(
                    f"canarymw: the optional C speedups were not built ({exc}); "
                    "the pure-Python implementation will be used."
                )
                return
            # Editable installs import from src/, so the module goes next to its source;
            # a regular wheel takes it from there too (it is ignored by git, hence an artifact).
            target = Path(self.root) / "src" / "canarymw" / built.name
            # Replaced by a rename, never rewritten in place: a process that has the old
            # module loaded (a running dev server) keeps its mapping intact.
            partial = target.with_name(f".{built.name}.partial")
            shutil.copyfile(built, partial)
            os.replace(partial, target)
        build_data["artifacts"].append(f"src/canarymw/{built.name}")
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _compile(self, tmp: Path) -> Path:
        from setuptools import Distribution, Extension
        from setuptools.command.build_ext import build_ext

        ext = Extension("canarymw._speedups", [str(Path(self.root) / SOURCE)])
        dist = Distribution({"name": "canarymw", "ext_modules": [ext]})
        cmd = build_ext(dist)
        cmd.build_lib = str(tmp / "lib")
        cmd.build_temp = str(tmp / "temp")
        cmd.ensure_finalized()
        cmd.run()
        return Path(cmd.get_ext_fullpath(ext.name))
