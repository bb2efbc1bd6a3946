"""Fixtures every test module can use: ``gateway``, the fake Databento HTTPS gateway."""

pytest_plugins = ["dbento_assets_tests.gateway"]
