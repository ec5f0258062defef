"""Pure rules: statuses, allowed transitions, errors. No I/O, no imports of our other layers."""
