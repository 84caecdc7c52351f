"""Training: one fit loop shared by every stage, the stages, and the whole-pipeline trainer."""
