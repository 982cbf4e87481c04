"""wanjax subpackage."""
