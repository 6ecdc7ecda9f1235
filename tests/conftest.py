"""Shared pytest plugins: fixture modules live beside the tests that use them."""

pytest_plugins = ["tests.kubo_node", "tests.cluster_node"]
