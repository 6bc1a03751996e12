"""The Chromium the browser tests drive, found once per test module, or a skip without one."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium_or_skip() -> str:
    """``$CHROMIUM``, or ``chromium`` or ``chromium-browser`` on the PATH.

    Without one, the calling test module (this is called at its top level) skips, unless
    ``CANARYMW_REQUIRE_BROWSER=1`` is set, as ``.ci/run`` does: then it fails.
    """
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CANARYMW_REQUIRE_BROWSER") == "1":
            raise RuntimeError(
                "CANARYMW_REQUIRE_BROWSER=1 but no Chromium was found (apt-get install chromium)."
            )
        pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
    return found
