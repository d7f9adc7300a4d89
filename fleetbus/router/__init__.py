"""The per-tenant router daemon: endpoints, liveness, delivery and verification, status."""
