"""Plain helpers shared by the tests (servers, wire, HTTP, recordings, waits); fixtures and
pytest options stay in ``tests/conftest.py``."""
