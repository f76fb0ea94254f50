"""``python -m ectfast.cli``: the ``ectfast`` command."""
import sys

from ectfast.cli import main

sys.exit(main())
