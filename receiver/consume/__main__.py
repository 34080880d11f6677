"""``python -m receiver.consume``: the same as ``receiver consume``."""

from receiver.consume.command import main

raise SystemExit(main())
