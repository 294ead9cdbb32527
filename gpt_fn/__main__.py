"""`python -m gpt_fn ...` is the `gpt-fn` command; torchrun launches it the same way:

torchrun --standalone --nproc-per-node 2 -m gpt_fn train [flags]
"""

import sys

from gpt_fn.cli import main

sys.exit(main())
