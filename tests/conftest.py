"""Shared test helpers: fresh random seeds (reported on failure) and distributed case running."""
import os
import random

import pytest


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed in the test's report so a failure can be replayed."""
    value = int(os.environ.get("FASTUSP_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
