"""The slot side: the sidecar, the hook entry point, and the stub reference agent."""
