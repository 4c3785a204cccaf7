"""``python -m nestvit ...`` is the ``nestvit`` command (useful under ``torchrun -m nestvit train ...``)."""

from .cli import main

raise SystemExit(main())
