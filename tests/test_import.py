"""Importing regkern never touches a GPU, xformers or a compiled extension."""

import subprocess
import sys
import textwrap


def test_import_queries_no_device_and_needs_no_optional_packages():
    code = textwrap.dedent(
        """
        import sys, torch
        def boom(*a, **k):
            raise AssertionError("device query at import time")
        for name in ("is_available", "device_count", "get_device_name", "get_device_properties",
                     "current_device", "init", "get_device_capability"):
            setattr(torch.cuda, name, boom)
        sys.modules["xformers"] = None          # import of xformers would fail
        sys.modules["regkern._C"] = None        # no compiled extension
        import regkern
        print("ok", regkern.__version__)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
