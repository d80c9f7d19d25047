"""The control plane: the expert controller (measured loads -> replicas added, moved, removed live). Consumes the
planner."""
