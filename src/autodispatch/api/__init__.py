"""HTTP routes: auth, sessions, waivers, payments, queue, assignments, flags, system."""
