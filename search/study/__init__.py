"""A study and its workers: storage and locks, worker processes and devices, retries, settings, progress."""
