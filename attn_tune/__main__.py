"""`python -m attn_tune` runs the command line."""

from attn_tune.cli.main import main

main()
