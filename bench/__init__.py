"""fastgpt's benchmarks (`pytest bench/`) and the one-command GPU report."""
