"""`python -m ldm_jax.cli ...` (the launch scripts' form of `ldm-jax`)."""

import sys

from ldm_jax.cli import main

sys.exit(main())
