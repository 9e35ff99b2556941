"""Running Tenure: embedded servers for development and tests, the dev stack, entry points."""
