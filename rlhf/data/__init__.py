"""The data stage, one package: loaders per source (loaders.py), user splits (splits.py), the built-in
simulator of users, click logs and labelers (simulator.py), and the build of every stage's datasets: SFT examples,
preference pairs and prompt sets (build.py; prepare.py, whose ``run_data`` is the `rlhf data prepare` workflow)."""
