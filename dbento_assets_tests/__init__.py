"""Tests for dbento_assets (pytest). Run with `pytest` from the repository root."""
