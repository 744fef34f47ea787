"""The hub: a TUF repository of model bundles and desired states, signed on one machine
and served by any static HTTP server; `edgefleet hub …` drives it."""
