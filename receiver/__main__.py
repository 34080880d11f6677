"""``python -m receiver``: the same as the ``receiver`` command."""

from receiver.cli import main

raise SystemExit(main())
