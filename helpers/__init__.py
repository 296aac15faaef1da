"""Small shared helpers used by the top-level scripts: one module per concern."""
