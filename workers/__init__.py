"""Everything that talks to the world: settings, Temporal and Redis clients, activities,
the worker."""
