"""``python -m kvstore.cli``: the same as the ``kvstore-cli`` entry point."""
import sys

from .main import main

sys.exit(main())
