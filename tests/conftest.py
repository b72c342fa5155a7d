"""Shared test helpers: fresh random seeds (reported on failure) and distributed case running."""
import os
import random
import sys

import pytest

# An installed fastusp_xdit_autoload.pth would activate fastusp at the first xfuser import of every test
# process (spawned workers inherit this variable). Tests activate explicitly; test_delivery checks the hook.
os.environ["FASTUSP_XDIT_AUTOLOAD"] = "0"
if "fastusp_xdit.xdit.hooks" in sys.modules:  # armed in this process at start-up
    sys.modules["fastusp_xdit.xdit.hooks"].disarm_autoload()


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed in the test's report so a failure can be replayed."""
    value = int(os.environ.get("FASTUSP_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
