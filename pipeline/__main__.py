"""python -m pipeline COMMAND [--config FILE] [--key value ...]: see pipeline/cli.py."""

from pipeline.cli import main

if __name__ == "__main__":  # the guard matters: vLLM starts its workers with spawn
    main()
