"""Small pieces every script uses: the one error type and run_main, torchrun set-up, locks, atomic files, safe checkpoint reading, the seed rule, the log, the fast path, the model registry."""
