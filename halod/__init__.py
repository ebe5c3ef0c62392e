"""HaloD: owns the route table of an Orbited cluster (see docs/architecture.md)."""
