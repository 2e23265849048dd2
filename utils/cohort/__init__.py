"""Cohorts: the pipeline over many section directories (`python -m utils.cohort`, README "Cohorts").

    sections.py   which directories (paths, quoted glob patterns, a list file; torchrun ranks' shares)
    runner.py     each stage as its own process, skipping current ones; the summary
    cli.py        the command line"""
