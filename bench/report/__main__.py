"""`python -m bench.report`: the GPU report (bench/report/__init__.py)."""

from bench.report import main
from fastgpt.cli import run_main

run_main(main, "bench.report")
