"""`import safeopt` loads no framework, nor do policy loading and the CLI's help."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "optax", "flax", "matplotlib")

CHECK = f"""
import sys
import safeopt
policy = safeopt.load_policy({{"clip_norm": 1.0, "clip_value": 0.5}})
safeopt.load_policy("default")
import safeopt.adapter
safeopt.adapter.installed_adapters()
import safeopt.telemetry, safeopt.testing
from safeopt.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
main(["check", "strict"])
loaded = sorted(set({FRAMEWORKS!r}) & set(sys.modules))
assert not loaded, loaded
print("clean")
"""


def test_import_loads_no_framework() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("clean")


def test_console_script_help_loads_no_framework() -> None:
    code = (
        "import sys, runpy; sys.argv = ['safeopt', '--help']\n"
        "try:\n    runpy.run_module('safeopt', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"assert not set({FRAMEWORKS!r}) & set(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "usage: safeopt" in out.stdout
