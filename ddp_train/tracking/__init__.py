"""What a run reports: the rank-aware console (console, warning_relay), progress bar or lines (progress),
console lines and metrics.jsonl (loggers), Weights & Biases (wandb_logger), process figures (sysinfo). Rank 0
logs; every other rank gets the do-nothing Logger and prints only its warnings and errors."""
