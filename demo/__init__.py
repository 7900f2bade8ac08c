"""`make demo`: the whole marketplace on this machine, in a few minutes, with nothing but Python."""
