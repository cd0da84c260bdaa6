"""Built-in graphs."""
