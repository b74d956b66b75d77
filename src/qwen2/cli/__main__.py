"""`python -m qwen2.cli ...` = `qwen2 ...`."""

import sys

from qwen2.cli import main

sys.exit(main())
