"""The reading side: tail, subscribe, consumer groups."""
