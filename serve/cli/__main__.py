"""`python -m serve.cli`: what the `llmserve` console script runs."""

import sys

from serve.cli import main

sys.exit(main())
