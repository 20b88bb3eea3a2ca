"""Built-in attention variants, one family per module; each module is a plugin registered like any other."""
