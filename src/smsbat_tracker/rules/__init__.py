"""The rules: what a check decides and when the next one comes. Pure, no I/O."""
