"""dcmdp: discrepancy-constrained RL post-training for LLMs when the rollout engine and trainer disagree."""

__version__ = "0.1.0"
