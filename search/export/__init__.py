"""Writing an architecture as standalone code."""
