"""`python -m llmkit ...` (and `torchrun -m llmkit pretrain ...`) runs the CLI."""

import sys

from llmkit.cli import main

sys.exit(main())
