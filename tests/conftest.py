"""Shared pytest configuration for the test suite."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds (e.g. a torch.compile build); deselect with -m 'not slow'"
    )
