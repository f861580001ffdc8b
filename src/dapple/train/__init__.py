"""Training: the procedural shapes world, the scorer that grades images of it, and (to come) training loops."""
