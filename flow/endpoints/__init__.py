"""The wire shape of each endpoint, as pure functions: status and body in, values out."""
