"""The ``python -m modus_mega.generate`` command: checkpoint locating and loading, request checking, the CLI."""
