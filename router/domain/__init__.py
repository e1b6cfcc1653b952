"""Domain model: aggregates, events and routing rules. Imports nothing else from the project."""
