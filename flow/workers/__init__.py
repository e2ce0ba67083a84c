"""Many workers on one PostgreSQL store: `flow plan` queues the requests the items need,
`flow worker` processes claim them under leases, sharing one rate limit per endpoint, key
and model (`docs/scale-out.md`)."""
