"""Passes: policy that decides WidthPlans (remove-dead, prune, grow, width)."""
