"""Health checks that make a node ineligible: a sans-IO state machine, thin Trio runners."""
