"""`python -m hywia`: the same as the `hywia` command."""
from .cli import main

raise SystemExit(main())
