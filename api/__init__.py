"""Tenure's GraphQL API: Strawberry on Starlette, mapping mutations to signals and reads to
the last-seen cache or live workflow queries."""
