"""What a run reports: console lines and metrics.jsonl (loggers), Weights & Biases (wandb_logger), process
figures (sysinfo). Rank 0 logs; every other rank gets the do-nothing Logger."""
