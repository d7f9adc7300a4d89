"""fleetbus: a message bus and router for fleets of long-lived AI agents.

The public entry points are :mod:`fleetbus.client` (orchestrator API), the ``fleet`` command
(:mod:`fleetbus.cli`) and the roster models in :mod:`fleetbus.config`.
"""

__version__ = "0.1.0"
