"""Know before you spend: a run's peak GPU memory and time from its config and its data's real lengths."""
