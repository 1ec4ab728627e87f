"""Importing Ultralytics through probe leaves the process's settings as they were: PIL's
Image.open, torch.save, torch's print options and the environment (Ultralytics changes each on
import). Checked in a fresh interpreter, where nothing imported it before."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ultralytics")

_SCRIPT = """
import json, os, sys
import numpy as np, torch
from PIL import Image
from probe.imports import import_leaving_state

def state():
    return {"open": Image.open.__module__ + "." + Image.open.__qualname__,
            "save": torch.save.__module__ + "." + torch.save.__qualname__,
            "linewidth": torch._tensor_str.PRINT_OPTS.linewidth, "numpy": np.get_printoptions()["linewidth"],
            "environment": sorted(os.environ.items())}

before = state()
tasks = import_leaving_state(sys.argv[1])
after = state()
import importlib
importlib.import_module(sys.argv[1])  # a plain import now finds it imported: nothing runs again
print(json.dumps({"before": before, "after": after, "again": state(), "has": hasattr(tasks, sys.argv[2])}))
"""


@pytest.mark.parametrize("module, attribute", [("ultralytics.nn.tasks", "DetectionModel"),
                                               ("ultralytics.utils.nms", "non_max_suppression")])
def test_importing_ultralytics_leaves_the_process_as_found(module, attribute):
    done = subprocess.run([sys.executable, "-c", _SCRIPT, module, attribute], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "YOLO_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["has"]
    assert found["before"]["open"] == "PIL.Image.open" and found["before"]["save"] == "torch.serialization.save"
    assert found["after"] == found["before"] and found["again"] == found["before"]


def test_a_plain_import_would_change_them():
    """The check above can fail: the same import without probe's guard changes Image.open."""
    done = subprocess.run([sys.executable, "-c", "import ultralytics.nn.tasks; from PIL import Image; "
                           "print(Image.open.__module__)"], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "YOLO_OFFLINE": "1"})
    assert done.stdout.strip().splitlines()[-1] != "PIL.Image"
