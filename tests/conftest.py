import os
import sys

# Tests import the top-level modules and scripts (models, losses, data, pretrain, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a few minutes; run them with `-m slow`")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"  # the default run stays fast
