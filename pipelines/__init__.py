"""Prefect flows and tasks: thin wrappers around ``sempa_train`` (no pipeline logic lives here)."""
