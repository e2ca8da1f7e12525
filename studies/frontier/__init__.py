"""The trade-off frontier: every method over its LR grid and seeds (plus interpolation points), compared
on task metric against forgetting (issue 18; docs: /work/shared/DESIGN.md "Comparing methods").

  run.py     the runner: trains and evaluates the points, writes points.jsonl and items/ (python -m studies.frontier)
  stats.py   the fronts, least forgetting at a task level, common levels, bootstrap intervals; the items layout
  report.py  frontier.md, frontier.png and the W&B table
"""
