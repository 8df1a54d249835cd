"""Reading a study back: artifacts, trial selection, the text summary."""
