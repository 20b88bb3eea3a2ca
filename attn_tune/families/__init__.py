"""Built-in attention variants, one family per module; each module is a plugin registered like any other.

(Named `families`, not `variants`: `attn_tune.variants` is the function that lists them.)
"""
