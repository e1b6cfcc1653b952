"""Several router nodes on one PostgreSQL database: who they are, which of them builds the
views and runs the once-per-cluster duties, and which one attempts each delivery."""
