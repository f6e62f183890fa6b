"""Several adapters over one base: combining them into one."""
