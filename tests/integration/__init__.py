"""integration-tier tests (tests/conftest.py says what each tier may use)."""
