"""Surgery: the only code that changes widths."""
