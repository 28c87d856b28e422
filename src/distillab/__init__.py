"""distillab: distill a teacher into a student, and measure what it gained, what it forgot and what it cost."""

__version__ = "0.1.0"
