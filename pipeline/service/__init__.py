"""`curate serve`: the curation pipeline as a service (jobs queued in SQLite, run by the same code as the
commands; training runs under the root read back for the pages). See DESIGN.md, "The service"."""
