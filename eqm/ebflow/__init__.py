"""Energy-based normalizing flows trained with score-matching objectives."""
