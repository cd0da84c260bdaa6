"""tokenbus: the application shell (settings, CLI, demo, offline model, private Redis)."""
