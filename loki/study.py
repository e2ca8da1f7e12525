"""`python -m loki.study ...`: the older name of `python -m studies ...` (the studies live in studies/)."""

if __name__ == "__main__":
    from studies.run import main

    main()
