"""A plugin whose import fails, as one with a missing binary dependency would."""

raise ImportError("libmissingkernel.so: cannot open shared object file")
