"""`python -m mistral_compile`: the same entry point as the `mistral-compile` command."""

import sys

from mistral_compile.cli.main import main

sys.exit(main())
