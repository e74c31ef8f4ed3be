"""The training engine: run() assembles the pieces, Trainer steps, CheckpointManager saves and resumes
them; the pieces (parallel wrapping, FSDP2, precision, optimizer, evaluation, preemption, state) beside."""
