"""The `attn-tune` command line (click)."""
