"""The study engine: the machinery around the method that runs a preset's study and tables it. study.py and
report.py at the repository's root are its commands; run_all.sh calls study.py after its set-up.

    presets.py   the presets (presets/NAME/*.args) and the recipes; no torch (run_all.sh asks it before set-up)
    jobs.py      a study's jobs, their commands (read by the scripts' own parsers), which are done, study.json
    cost.py      what the jobs cost on this machine: measured before anything runs, predicted job by job
    pool.py      the jobs on JOBS slots as processes, the time box, stopping, the progress line and its ETA
    report.py    the tables and their words, from the jobs' files (RESULTS.md, results.csv)
    stats.py     the statistics of the tables: paired t, one-sample t, 95% intervals, the sign test
    figure.py    results.svg, and budget.svg where a study is set beside the same runs at a shorter budget

The words: a study grows over slices (one invocation each, time-boxed or not); its jobs are runs (one recipe's
pretraining of a network and seed with its kNN and linear evaluation), references (a network and seed untrained,
and with the data's BN statistics) and raw pixels; a job's stages are commands; the two runs of a network and seed
are a pair, and a line of the plan runs a pair or one other job.
"""
