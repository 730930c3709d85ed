"""ml_collections configs; ``get_config("smoke")`` selects the seconds-long synthetic variant."""
